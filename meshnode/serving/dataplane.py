"""The node's transport-neutral core: inference, readiness, metadata.

Servicers only convert and call in here. The hit path of `infer` is a dict lookup, the model's
own infer, and a few counter updates; a miss goes to the router, which serves it here, at a
peer's copy, or wherever placement loads it. Hop metadata is only read on a miss.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from meshnode.errors import ModelLost, ModelNotFound, ModelUnavailable
from meshnode.observability.metrics import NodeMetrics
from meshnode.runtimes.base import CallerMetadata, ModelSource, Runtime
from meshnode.serving.cache import CachedModel, LoadOptions, ModelCache
from meshnode.state.registry import ModelRecord, Registry
from meshnode.storage.repository import list_versions, model_source
from meshpb import pb
from router.hop import PARAMETER_KEY, Hop
from router.router import Router

TimeRemaining = Callable[[], float | None]

SERVER_NAME = "meshserve"
SERVER_EXTENSIONS = ("model_repository", "model_repository(unload_dependents)", "parameters")


class DataPlane:
    def __init__(
        self, *, registry: Registry, cache: ModelCache, runtime: Runtime, metrics: NodeMetrics, version: str
    ) -> None:
        self._registry = registry
        self._cache = cache
        self._runtime = runtime
        self._metrics = metrics
        self._version = version
        self.ready = False
        self.router: Router | None = None  # set by the composition root once the mesh is up
        self.metadata_elsewhere: Callable[[str, str], Awaitable[pb.ModelMetadataResponse | None]] | None = None
        self.inflight = 0
        # alias -> model (meshnode.state.aliases keeps it current); read only when a name is not cached here.
        self.alias_targets: Mapping[str, str] = {}

    async def infer(
        self, request: pb.ModelInferRequest, metadata: CallerMetadata | None = None,
        time_remaining: TimeRemaining | None = None,
    ) -> pb.ModelInferResponse:
        """A client's or a peer's request: a local hit, else routed through the mesh."""
        started = time.perf_counter()
        metrics = self._metrics
        metrics.api_requests += 1
        self.inflight += 1
        entry = self._cache.ready.get((request.model_name, request.model_version))
        if entry is None and (target := self.alias_targets.get(request.model_name)) is not None:
            # Served as the model the alias points at now; the response names that model.
            request.model_name = target
            entry = self._cache.ready.get((target, request.model_version))
        try:
            if entry is not None:
                entry.inflight += 1
                metrics.cache_hits += 1
                try:
                    return await self._run(entry, request, started, time_remaining() if time_remaining else None,
                                           metadata)
                except ModelLost:
                    if self.router is None:
                        raise  # without a mesh there is nothing to route to: the client retries
                    # _run forgot the copy: the router below loads it again, here or elsewhere.
            if self.router is None:
                return await self.infer_local(request)
            hop = Hop.from_metadata(metadata() if metadata is not None else None)
            sent = request.parameters.get(PARAMETER_KEY)
            if sent is not None:  # from a peer: the hop rides in the request (router.hop)
                hop = Hop.decode(sent.string_param, hop.propagated)
            return await self.router.route(request, hop, time_remaining() if time_remaining is not None else None)
        finally:
            self.inflight -= 1
            metrics.observe_api_ms((time.perf_counter() - started) * 1000.0)

    async def infer_local(self, request: pb.ModelInferRequest, churn_guard: bool = False) -> pb.ModelInferResponse:
        """Serve here, loading the model into this node's cache if needed.

        With `churn_guard`, a load that would evict recently used models is refused (another node
        may take it) rather than flushing this node's hot set.
        """
        started = time.perf_counter()
        entry = await self.acquire(request.model_name, request.model_version, churn_guard)
        return await self._run(entry, request, started)

    async def _run(self, entry: CachedModel, request: pb.ModelInferRequest, started: float,
                   timeout_s: float | None = None, metadata: CallerMetadata | None = None) -> pb.ModelInferResponse:
        metrics = self._metrics
        try:
            return await entry.model.infer(request, timeout_s, metadata)  # type: ignore[union-attr]
        except BaseException as error:
            metrics.invoke_failures += 1
            if isinstance(error, ModelLost):
                self._cache.forget(entry)
            raise
        finally:
            self._cache.release(entry)
            metrics.invoke_count += 1
            metrics.observe_invoke_ms((time.perf_counter() - started) * 1000.0)

    def has_copy(self, name: str, version: str) -> bool:
        return self._cache.has_entry(name, version)

    async def acquire(self, name: str, version: str, churn_guard: bool = False) -> CachedModel:
        """A loaded entry for the model (loading it here if needed); the caller releases it."""
        record = self._registry.get(name)
        if record is None or not record.enabled:
            raise ModelNotFound.unknown(name)
        if not record.runs_on(self._runtime.name):
            raise ModelUnavailable(f"model '{name}' runs on {record.runtime} nodes; this node runs "
                                   f"{self._runtime.name}")
        source = model_source(name, Path(record.storage), version)
        return await self._cache.acquire(source, version, self.load_options(record, source, churn_guard))

    def load_options(self, record: ModelRecord, source: ModelSource, churn_guard: bool = False) -> LoadOptions:
        # Size: the registered hint, else what a node measured, else a prediction from the files.
        predicted = record.size_hint or record.size_bytes or self._runtime.predict_size(source)
        return LoadOptions(predicted_bytes=predicted, timeout_s=record.load_timeout_s, pinned=record.pinned,
                           churn_guard=churn_guard, last_used=record.last_used)

    def model_ready(self, name: str, version: str) -> bool:
        """True when a request for the model would be served now: a copy in the mesh, or loadable."""
        name = self.alias_targets.get(name, name)
        if (name, version) in self._cache.ready:
            return True
        record = self._registry.get(name)
        if record is None or not record.enabled:
            return False
        if not version and any(c["state"] == "loaded" for c in record.copies.values()):
            return True
        versions = list_versions(Path(record.storage))
        wanted = version or (versions[-1] if versions else "")
        return wanted in versions and not self._cache.failures.active(name, wanted)

    async def model_metadata(self, name: str, version: str, forwarded: bool = False) -> pb.ModelMetadataResponse:
        """From a copy here, else from a copy elsewhere; a load here only when the mesh has none.

        Clients ask for metadata before their first request: loading a copy on every node they
        touch would defeat placement. For an alias, the answer names the alias: what to send requests to.
        """
        model = self.alias_targets.get(name)
        if model is not None:
            found = await self.model_metadata(model, version, forwarded)
            found.name = name
            return found
        if not forwarded and self.metadata_elsewhere is not None and not self._cache.has_entry(name, version):
            found = await self.metadata_elsewhere(name, version)
            if found is not None:
                return found
        entry = await self.acquire(name, version)
        try:
            model = entry.model
            assert model is not None
            record = self._registry.get(name)
            versions = list_versions(Path(record.storage)) if record else [model.version]
            return pb.ModelMetadataResponse(
                name=name,
                versions=versions,
                platform=model.platform,
                inputs=[_tensor_metadata(t) for t in model.inputs],
                outputs=[_tensor_metadata(t) for t in model.outputs],
            )
        finally:
            self._cache.release(entry)

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=SERVER_EXTENSIONS)


class LocalCopies:
    """This node as the router sees it (router.ports.LocalNode)."""

    def __init__(self, dataplane: DataPlane, instance_id: str) -> None:
        self._dataplane = dataplane
        self.instance_id = instance_id

    def has_copy(self, name: str, version: str) -> bool:
        return self._dataplane.has_copy(name, version)

    async def infer(self, request: pb.ModelInferRequest, churn_guard: bool = False) -> pb.ModelInferResponse:
        return await self._dataplane.infer_local(request, churn_guard)


def _tensor_metadata(spec: object) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=spec.shape  # type: ignore[attr-defined]
    )
