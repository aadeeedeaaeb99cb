"""This node's copies of models: acquire one (loading it here when needed) and run a request on it.

Both ways into a copy here use this one part: the dataplane runs cache hits on it directly, and the
router (router.ports.LocalNode) sends it the misses that placement serves on this node.

A model's registration may bound its inference (`timeout_ms`): `run` reads it from the registry's view on
every request (one dict get), so a re-registration that changes it applies at once to copies already
loaded, which it does not reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from meshnode.errors import DeadlineExceeded, ModelLost, ModelNotFound, ModelUnavailable
from meshnode.observability.metrics import NodeMetrics
from meshnode.observability.tracing import Tracing, status_code
from meshnode.runtimes.base import CallerMetadata, LoadedModel, Runtime
from meshnode.serving.cache import ModelCache
from meshnode.serving.entries import CachedModel, LoadOptions
from meshnode.serving.runtime_status import RuntimeStatus
from meshnode.serving.sequences import DEFAULT_IDLE_S, Sequences
from meshnode.serving.statistics import ModelStatistics
from meshnode.state.registry import ModelRecord, Registry
from meshnode.storage.model_files import ModelFiles
from meshnode.storage.repository import ModelSource, available_versions, model_source
from meshnode.storage.versions import read_config
from meshpb import pb
from router.errors import MeshError

INVOKE = "ModelInfer"  # the runtime's method, in the invoke metrics' labels
RUN_TIME_WEIGHT = 0.2  # of each new run in a copy's smoothed run time: a few runs follow a change in load


class LocalReplica:
    def __init__(self, *, instance_id: str, registry: Registry, cache: ModelCache, runtime: Runtime,
                 metrics: NodeMetrics, status: RuntimeStatus, tracing: Tracing | None = None,
                 statistics: ModelStatistics | None = None, files: ModelFiles | None = None,
                 sequences: Sequences | None = None) -> None:
        self.instance_id = instance_id
        self._files = files or ModelFiles(None)  # where a model's files are here: local, or a store's on disk
        self._tracing = tracing  # None: tracing is off
        self._status = status
        self._registry = registry
        self._records = registry.view  # the view itself (kept current in place): one dict get per request
        self._cache = cache
        self._runtime = runtime
        self._metrics = metrics
        self._statistics = statistics or ModelStatistics()  # what ran here, for ModelStatistics
        self.sequences = sequences or Sequences(instance_id, self._sequence_idle_s, cache.wall_clock)

    def has_copy(self, name: str, version: str) -> bool:
        return self._cache.has_entry(name, version)

    async def infer(self, request: pb.ModelInferRequest, churn_guard: bool = False) -> pb.ModelInferResponse:
        """Serve here, loading the model into this node's cache if needed.

        With `churn_guard`, a load that would evict recently used models is refused (another node
        may take it) rather than flushing this node's hot set.
        """
        started = time.perf_counter()
        entry = await self.acquire(request.model_name, request.model_version, churn_guard)
        if self._tracing is None:
            return await self.run(entry, request, started)
        return await self._tracing.run(self.run(entry, request, started), entry.name, entry.version)

    async def run(self, entry: CachedModel, request: pb.ModelInferRequest, started: float,
                  timeout_s: float | None = None, metadata: CallerMetadata | None = None,
                  admitted: bool = False) -> pb.ModelInferResponse:
        """Run one request on an acquired entry, and release it.

        `timeout_s` is what is left of the client's deadline (None: none, or not known here); the model's
        registered timeout, when shorter, ends the request with DeadlineExceeded. The request's sequence is
        admitted here (serving.sequences) unless the caller did (`admitted`).
        """
        metrics = self._metrics
        assert entry.model is not None  # acquired entries are loaded
        code = "OK"
        inputs, began = entry.model.inputs, time.perf_counter()  # the entry may be forgotten by the end
        waited = entry.inflight > self._cache.queues.runs_per_copy  # then its time says more of the queue
        try:
            if not admitted:
                self.sequences.admit(entry, request)
            record = self._records.get(entry.name)
            if record is None or record.timeout_ms is None:
                return await entry.model.infer(request, timeout_s, metadata)
            return await _bounded(entry.model, request, record.timeout_ms, timeout_s, metadata)
        except BaseException as error:
            metrics.invoke_failures += 1
            code = status_code(error).name
            if isinstance(error, ModelLost):
                self._cache.forget(entry)
            raise
        finally:
            self._cache.release(entry)
            metrics.invoke_count += 1
            ended = time.perf_counter()
            if code == "OK" and not waited:
                entry.run_s += RUN_TIME_WEIGHT * (ended - began - entry.run_s) if entry.run_s else ended - began
            self._statistics.finished(entry.name, entry.version, inputs, request, started, began, ended,
                                      code == "OK")
            metrics.observe_invoke(INVOKE, code, (ended - started) * 1000.0, entry.name)

    async def acquire(self, name: str, version: str, churn_guard: bool = False) -> CachedModel:
        """A loaded entry for the model (loading it here if needed); the caller releases it."""
        record = self._registry.get(name)
        if record is None or not record.enabled:
            raise ModelNotFound.unknown(name)
        if not record.runs_on(self._runtime.name):
            raise ModelUnavailable(f"model '{name}' runs on {record.runtime} nodes; this node runs "
                                   f"{self._runtime.name}")
        if self._status.down_reason is not None:  # another node serves it (retry_elsewhere)
            raise ModelUnavailable(f"model '{name}' cannot be served on node {self.instance_id}: "
                                   f"{self._status.down_reason}")
        async with self.source(record, version) as source:
            return await self._cache.acquire(source, version, self.load_options(record, source, churn_guard))

    @contextlib.asynccontextmanager
    async def source(self, record: ModelRecord, version: str) -> AsyncIterator[ModelSource]:
        """The files of one version of the model here, for as long as the block runs: a store's model is
        downloaded to this node's disk tier first (once), within the model's load timeout."""
        async with self._files.opened(record.storage, record.load_timeout_s or self._cache.load_timeout_s) as files:
            yield model_source(record.name, files, version, record.config_override)

    def served_versions(self, record: ModelRecord) -> list[str] | None:
        """The versions the model's policy serves, read from its files here; None when this node does not have
        them (a store's model it never pulled). Raises LoadFailed for a broken config.pbtxt."""
        files = self._files.on_disk(record.storage)
        return available_versions(files, record.config_override) if files is not None else None

    def load_options(self, record: ModelRecord, source: ModelSource, churn_guard: bool = False) -> LoadOptions:
        return LoadOptions(predicted_bytes=record.effective_size(lambda: self._predicted_size(source)),
                           timeout_s=record.load_timeout_s, pinned=record.pinned, churn_guard=churn_guard,
                           last_used=record.last_used)

    def _sequence_idle_s(self, entry: CachedModel) -> float:
        """The copy's max_sequence_idle_microseconds in seconds (Triton's default when unset), from its
        config.pbtxt here; 0 when the model has no sequence batching."""
        record = self._records.get(entry.name)
        if record is None:
            return 0.0
        files = self._files.on_disk(record.storage)
        if files is None or not files.is_dir():
            return 0.0
        try:
            config = read_config(files, record.config_override)
        except MeshError:  # a config broken since the load: as without one
            return 0.0
        if not config.HasField("sequence_batching"):
            return 0.0
        idle_us = config.sequence_batching.max_sequence_idle_microseconds
        return idle_us / 1e6 if idle_us else DEFAULT_IDLE_S

    def _predicted_size(self, source: ModelSource) -> int:
        started = time.perf_counter()
        try:
            return self._runtime.predict_size(source)
        finally:
            self._metrics.observe_sizing_ms((time.perf_counter() - started) * 1000.0)


async def _bounded(model: LoadedModel, request: pb.ModelInferRequest, timeout_ms: int, timeout_s: float | None,
                   metadata: CallerMetadata | None) -> pb.ModelInferResponse:
    """The model's infer, abandoned after its registered timeout unless the client's deadline comes first.

    Abandoning cancels the runtime's call: a Triton call is cancelled; an ONNX Runtime session run that
    already started finishes in its worker thread and its answer is dropped, one still queued never runs.
    """
    limit_s = timeout_ms / 1000.0
    if timeout_s is not None and timeout_s <= limit_s:
        # The client's deadline is the shorter: it ends the call as it does for a model without a timeout.
        return await model.infer(request, timeout_s, metadata)
    limit = asyncio.timeout(limit_s)
    try:
        async with limit:
            return await model.infer(request, timeout_s, metadata)
    except TimeoutError:
        if not limit.expired():
            raise  # the runtime's own, not this limit's
        raise DeadlineExceeded(f"inference of model '{model.name}' version {model.version} exceeded its timeout "
                               f"of {timeout_ms} ms") from None
