"""Prometheus ``/metrics`` for a mesh node, named after ModelMesh's metrics so its dashboards keep working.

Why the hot path does not touch OpenTelemetry instruments: measured here, ``Histogram.record()`` costs
~8.5 µs and ``Counter.add()`` ~7.5 µs (SDK 1.45.2), against a ~200 µs CPU budget per request. So the
request path only bumps plain ints and local fixed-bucket histograms (observability.histograms); OTel
observable instruments read the ints at scrape time, and the histograms are prometheus_client collectors
on the same private registry, because OTel has no asynchronous histogram.

Labels are ModelMesh's and bounded: `method` and `code` (a gRPC status name) on the API and invoke
histograms and the message sizes; `modelId` too with `per_model_metrics` N > 0, for the N models with the
most requests lately only (every other model's requests go under modelId=""), so a mesh of 100K models
cannot explode the series count. The mesh-wide gauges (models loaded, with failures, managed) are exported
only by the node given the mesh's totals (`NodeState.mesh`: one node per mesh), as ModelMesh's leader does.

Everything here is meant to be touched from the node's event loop thread only: ``+=`` on an attribute
and the histogram slot increments are not atomic across threads, and scrapes run on the loop, which
also makes each scrape a consistent snapshot.
"""

from __future__ import annotations

import functools
import heapq
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import attrgetter

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from meshnode.observability.histograms import (
    AGE_BUCKETS_MS,
    MESSAGE_BUCKETS,
    MODEL_SIZE_BUCKETS,
    MS_BUCKETS,
    Histogram,
)

__all__ = ["MeshTotals", "NodeMetrics", "NodeState"]

_Callback = Callable[[CallbackOptions], Iterable[Observation]]

# (Prometheus family name, NodeMetrics attribute, help); the exporter appends ``_total``.
_COUNTERS = (
    ("modelmesh_invoke_model", "invoke_count", "Count of internal model server inference requests"),
    ("modelmesh_invoke_model_failure", "invoke_failures", "Failed internal model server inference requests"),
    ("modelmesh_api_request", "api_requests", "Count of external inference requests"),
    ("modelmesh_cache_hit", "cache_hits", "Count of inference requests served by an already loaded copy"),
    ("modelmesh_cache_miss", "cache_misses", "Count of inference request cache misses"),
    ("modelmesh_loadmodel", "loads", "Count of model loads"),
    ("modelmesh_loadmodel_failure", "load_failures", "Model load failures"),
    ("modelmesh_unloadmodel", "unloads", "Count of model unloads"),
    ("modelmesh_unloadmodel_failure", "unload_failures",
     "Unload model failures (not counting multiple attempts for same copy)"),
    ("modelmesh_unloadmodel_attempt_failure", "unload_attempt_failures", "Unload model attempt failures"),
    ("modelmesh_evictions", "evictions", "Count of model copy evictions"),
    ("meshserve_etcd_writes", "etcd_writes", "Write requests this node sent to etcd"),
    ("meshserve_requests_rejected", "requests_rejected",
     "Inference requests refused at once (RESOURCE_EXHAUSTED) because a bound of waiting or in-flight requests "
     "was reached"),
    ("meshserve_hops_stripped", "hops_stripped",
     "Hop parameters stripped from requests whose caller did not prove it is a mesh member"),
)

@dataclass(frozen=True, slots=True)
class MeshTotals:
    """Counts over the whole mesh, exported by one node only (ModelMesh's global gauges)."""

    models_loaded: int  # models with at least one loaded copy on a live node
    models_with_failure: int  # models with a recent load failure
    models_managed: int  # registered models


@dataclass(frozen=True, slots=True)
class NodeState:
    """What the node reports for the gauges; read once per scrape."""

    capacity_bytes: int
    used_bytes: int
    models_loaded: int  # copies loaded here
    lru_time_s: float | None  # epoch seconds of the least recently used loaded copy; None if none loaded
    etcd_writes: int = 0  # write requests sent to etcd since start
    requests_queued: int = 0  # requests waiting here for a model's load or for a run slot of its copy
    # The disk tier's counts since start and its size now (meshnode.storage.materializer.StorageStats).
    storage_pulled_bytes: int = 0
    storage_pull_seconds: float = 0.0
    disk_cache_hits: int = 0
    disk_cache_misses: int = 0
    disk_cache_bytes: int = 0
    disk_cache_models: int = 0
    mesh: MeshTotals | None = None  # given to the one node that reports for the mesh


def _mesh(read: Callable[[MeshTotals], int]) -> Callable[[NodeState], float | None]:
    return lambda state: None if state.mesh is None else read(state.mesh)


def _lru_age_s(state: NodeState) -> float:
    # ModelMesh reports age 0 when nothing is loaded; keep that so its alerts behave the same.
    return 0.0 if state.lru_time_s is None else max(0.0, time.time() - state.lru_time_s)


def _used_bps(state: NodeState) -> int:
    return 0 if state.capacity_bytes <= 0 else int(state.used_bytes * 10_000 / state.capacity_bytes)


# Counters kept by other parts and read from the scrape's state: (Prometheus name, help, reader).
_STATE_COUNTERS: tuple[tuple[str, str, Callable[[NodeState], float]], ...] = (
    ("meshserve_storage_pulled_bytes", "Bytes of models downloaded from model stores",
     attrgetter("storage_pulled_bytes")),
    ("meshserve_storage_pull_seconds", "Seconds spent downloading models from stores",
     attrgetter("storage_pull_seconds")),
    ("meshserve_disk_cache_hits", "Loads of a store's model found current in the disk tier",
     attrgetter("disk_cache_hits")),
    ("meshserve_disk_cache_misses", "Loads of a store's model that downloaded it", attrgetter("disk_cache_misses")),
)

# (Prometheus name, OTel unit, help, reader); the exporter maps "s"/"By" to the suffixes already present.
_GAUGES: tuple[tuple[str, str, str, Callable[[NodeState], float | None]], ...] = (
    ("modelmesh_instance_lru_seconds", "s", "Last used time of LRU model in pod (secs since epoch)",
     attrgetter("lru_time_s")),
    ("modelmesh_instance_lru_age_seconds", "s", "Last used age of LRU model in pod (secs ago)", _lru_age_s),
    ("modelmesh_instance_capacity_bytes", "By", "Effective model capacity of pod excluding unload buffer",
     attrgetter("capacity_bytes")),
    ("modelmesh_instance_used_bytes", "By", "Amount of capacity currently in use by loaded models",
     attrgetter("used_bytes")),
    ("modelmesh_instance_used_bps", "", "Amount of capacity used in basis points (100ths of percent)",
     _used_bps),
    ("modelmesh_instance_models_total", "", "Number of model copies loaded in pod",
     attrgetter("models_loaded")),
    ("modelmesh_models_loaded_total", "", "Total number of models with at least one loaded copy",
     _mesh(attrgetter("models_loaded"))),
    ("modelmesh_models_with_failure_total", "", "Total number of models with one or more recent load failures",
     _mesh(attrgetter("models_with_failure"))),
    ("modelmesh_models_managed_total", "", "Total number of models managed", _mesh(attrgetter("models_managed"))),
    ("meshserve_disk_cache_bytes", "By", "Bytes of models kept in the disk tier", attrgetter("disk_cache_bytes")),
    ("meshserve_disk_cache_models", "", "Models kept in the disk tier", attrgetter("disk_cache_models")),
    ("meshserve_requests_queued", "", "Inference requests waiting on this node for a model's load or for a "
     "free run slot of its copy", attrgetter("requests_queued")),
)  # fmt: skip


class NodeMetrics:
    """One node's metrics: plain-int counters, cheap histograms, gauges from a state callback.

    Counters are public ints, incremented by the caller (``metrics.cache_hits += 1``); the ``observe_*``
    methods record into histograms only and do not touch the counters.
    """

    def __init__(self, per_model_metrics: int = 0) -> None:
        """`per_model_metrics`: how many of the busiest models get a `modelId` label of their own (0: none)."""
        self.invoke_count = 0
        self.invoke_failures = 0
        self.api_requests = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.loads = 0
        self.load_failures = 0
        self.unloads = 0
        self.unload_failures = 0
        self.unload_attempt_failures = 0
        self.evictions = 0
        self.etcd_writes = 0  # the etcd store's count, as of the last scrape
        self.requests_rejected = 0
        self.hops_stripped = 0  # forged or unauthenticated hops (meshnode.api.inference)
        # Requests that ran without waiting (a free run slot on a loaded copy): the queue delay histogram's
        # zeros, bumped as an int on the hit path.
        self.ran_without_waiting = 0

        self._per_model = per_model_metrics
        self._requests_by_model: dict[str, int] = {}  # lately, halved at each scrape; only with per-model labels
        self._busiest: frozenset[str] = frozenset()
        labels = ("method", "code", "modelId") if per_model_metrics else ("method", "code")
        self._invoke = Histogram("modelmesh_invoke_model_milliseconds", "Internal model server inference request "
                                 "time", MS_BUCKETS, labels=labels)
        self._api = Histogram("modelmesh_api_request_milliseconds", "External inference request time", MS_BUCKETS,
                              labels=labels)
        self._request_size = Histogram("modelmesh_request_size_bytes", "Inference request payload size",
                                       MESSAGE_BUCKETS, unit="bytes", labels=labels)
        self._response_size = Histogram("modelmesh_response_size_bytes", "Inference response payload size",
                                        MESSAGE_BUCKETS, unit="bytes", labels=labels)
        self._labelled = (self._invoke, self._api, self._request_size, self._response_size)
        self._cache_miss = Histogram("modelmesh_cache_miss_milliseconds", "Cache miss delay", MS_BUCKETS)
        self._load = Histogram("modelmesh_loadmodel_milliseconds", "Time taken to load model", MS_BUCKETS)
        self._unload = Histogram("modelmesh_unloadmodel_milliseconds", "Time taken to unload model", MS_BUCKETS)
        self._eviction_age = Histogram("modelmesh_age_at_eviction_milliseconds",
                                       "Time since model was last used when evicted", AGE_BUCKETS_MS)
        self._queue_delay = Histogram(
            "modelmesh_req_queue_delay_milliseconds",
            "Time a request waited on this node before it ran: for its model's load, then for a run slot",
            MS_BUCKETS, zeros=lambda: self.ran_without_waiting)
        self._loading_queue_delay = Histogram("modelmesh_loading_queue_delay_milliseconds",
                                              "Time spent in model loading queue", MS_BUCKETS)
        self._sizing = Histogram("modelmesh_model_sizing_milliseconds", "Time taken to perform model sizing",
                                 MS_BUCKETS)
        self._model_size = Histogram("modelmesh_loaded_model_size_bytes", "Reported size of loaded model",
                                     MODEL_SIZE_BUCKETS, unit="bytes")

        self._scrape_state: NodeState | None = None

        # Private registry and provider so several nodes (or tests) can coexist in one process.
        self._registry = CollectorRegistry()
        for histogram in (*self._labelled, self._cache_miss, self._load, self._unload, self._eviction_age,
                          self._queue_delay, self._loading_queue_delay, self._sizing, self._model_size):
            self._registry.register(histogram)
        reader = PrometheusMetricReader(
            disable_target_info=True, scope_info_enabled=False, registry=self._registry
        )
        # The empty resource keeps OTEL_* environment variables out of the output; there is nothing to
        # flush for a pull exporter, so skip the atexit hook each provider would otherwise pin forever.
        meter = MeterProvider(
            metric_readers=[reader], resource=Resource.get_empty(), shutdown_on_exit=False
        ).get_meter("meshnode")
        for name, attr, help_text in _COUNTERS:
            meter.create_observable_counter(
                name, callbacks=[self._counter_callback(attr)], description=help_text
            )
        for name, help_text, count in _STATE_COUNTERS:
            meter.create_observable_counter(name, callbacks=[self._state_callback(count)], description=help_text)
        for name, unit, help_text, read in _GAUGES:
            meter.create_observable_gauge(
                name, callbacks=[self._state_callback(read)], unit=unit, description=help_text
            )

    def _labels(self, method: str, code: str, model: str) -> tuple[str, ...]:
        if not self._per_model:
            return (method, code)
        self._requests_by_model[model] = self._requests_by_model.get(model, 0) + 1
        return (method, code, model if model in self._busiest else "")

    def observe_api(self, method: str, code: str, ms: float, model: str, request_bytes: int,
                    response_bytes: int | None = None) -> Callable[[int], None]:
        """One external request (`code`: its gRPC status name); `response_bytes` None when it failed or is not
        known yet. Returns what records the response's size later: its length as the gRPC edge writes it
        (meshnode.net.transport), since measuring a message here would serialize it once more."""
        labels = self._labels(method, code, model)
        self._api.observe(ms, labels)
        self._request_size.observe(request_bytes, labels)
        if response_bytes is not None:
            self._response_size.observe(response_bytes, labels)
        return functools.partial(self._response_size.observe, labels=labels)

    def observe_invoke(self, method: str, code: str, ms: float, model: str) -> None:
        """One run of a request on a copy here."""
        labels = (method, code, model if model in self._busiest else "") if self._per_model else (method, code)
        self._invoke.observe(ms, labels)

    def observe_cache_miss_ms(self, ms: float) -> None:
        self._cache_miss.observe(ms)

    def observe_load(self, ms: float, size_bytes: int) -> None:
        self._load.observe(ms)
        self._model_size.observe(size_bytes)

    def observe_unload_ms(self, ms: float) -> None:
        self._unload.observe(ms)

    def observe_eviction_age_ms(self, ms: float) -> None:
        self._eviction_age.observe(ms)

    def observe_queue_delay_ms(self, ms: float) -> None:
        """A request that waited (for a load or a run slot) before it ran; one that did not wait is counted
        by `ran_without_waiting += 1` instead."""
        self._queue_delay.observe(ms)

    def observe_loading_queue_delay_ms(self, ms: float) -> None:
        """A load's wait in the load queue before it started."""
        self._loading_queue_delay.observe(ms)

    def observe_sizing_ms(self, ms: float) -> None:
        self._sizing.observe(ms)

    def _choose_busiest(self) -> None:
        """The models labelled from now on: the most requested since the last scrapes (halved each time, so a
        model that went quiet leaves the set); series of models that left it are no longer exported."""
        counts = self._requests_by_model
        self._busiest = frozenset(heapq.nlargest(self._per_model, counts, key=counts.__getitem__))
        self._requests_by_model = {m: n // 2 for m, n in counts.items() if n > 1}
        for histogram in self._labelled:
            histogram.keep_only(2, self._busiest)

    def render(self, state: NodeState | None = None) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every metric of this node; gauges only with
        a `state` (one snapshot, so that all gauges of one scrape describe the same moment)."""
        self._scrape_state = state
        if state is not None:
            self.etcd_writes = state.etcd_writes
        if self._per_model:
            self._choose_busiest()
        try:
            return generate_latest(self._registry)
        finally:
            self._scrape_state = None

    def _counter_callback(self, attr: str) -> _Callback:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return (Observation(getattr(self, attr)),)

        return observe

    def _state_callback(self, read: Callable[[NodeState], float | None]) -> _Callback:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            value = None if self._scrape_state is None else read(self._scrape_state)
            return () if value is None else (Observation(value),)

        return observe
