"""Prometheus ``/metrics`` for a mesh node, named after ModelMesh's metrics so its dashboards keep working.

Why the hot path does not touch OpenTelemetry instruments: measured here, ``Histogram.record()`` costs
~8.5 µs and ``Counter.add()`` ~7.5 µs (SDK 1.45.2), against a ~200 µs CPU budget per request. So the
request path only bumps plain ints and a local fixed-bucket histogram (bisect + list slot, well under
1 µs); OTel observable instruments read the ints at scrape time, and the histograms are published by a
prometheus_client collector on the same private registry, because OTel has no asynchronous histogram.
All seven histograms share that mechanism so their bucket layout and naming cannot drift apart.

Everything here is meant to be touched from the node's event loop thread only: ``+=`` on an attribute
and the histogram slot increments are not atomic across threads, and scrapes run on the loop, which
also makes each scrape a consistent snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from operator import attrgetter

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import HistogramMetricFamily

__all__ = ["MetricsServer", "NodeMetrics", "NodeState", "serve_metrics"]

_log = logging.getLogger(__name__)

_Callback = Callable[[CallbackOptions], Iterable[Observation]]

# ModelMesh's MS_TIME_BUCKETS and AGE_HISTO buckets, so existing histogram_quantile panels line up.
_MS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 75, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 6e4, 1.2e5, 3e5)
_AGE_BUCKETS_MS = tuple(
    minutes * 60_000 for minutes in (0.5, 5, 15, 60, 240, 720, 1440, 10080, 43200, 129600)
)

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
    ("modelmesh_unloadmodel_failure", "unload_failures", "Unload model failures"),
    ("modelmesh_evictions", "evictions", "Count of model copy evictions"),
    ("meshserve_etcd_writes", "etcd_writes", "Write requests this node sent to etcd"),
    ("meshserve_requests_rejected", "requests_rejected",
     "Inference requests refused at once (RESOURCE_EXHAUSTED) because a bound of waiting or in-flight requests "
     "was reached"),
    ("meshserve_hops_stripped", "hops_stripped",
     "Hop parameters stripped from requests whose caller did not prove it is a mesh member"),
)

_READ_TIMEOUT_S = 5.0
_MAX_REQUEST_HEAD = 8192


@dataclass(frozen=True, slots=True)
class NodeState:
    """What the node reports for the gauges; read once per scrape."""

    capacity_bytes: int
    used_bytes: int
    models_loaded: int
    models_managed: int
    models_with_failure: int
    lru_time_s: float | None  # epoch seconds of the least recently used loaded copy; None if none loaded
    etcd_writes: int = 0  # write requests sent to etcd since start
    requests_queued: int = 0  # requests waiting here for a model's load or for a run slot of its copy


def _lru_age_s(state: NodeState) -> float:
    # ModelMesh reports age 0 when nothing is loaded; keep that so its alerts behave the same.
    return 0.0 if state.lru_time_s is None else max(0.0, time.time() - state.lru_time_s)


def _used_bps(state: NodeState) -> int:
    return 0 if state.capacity_bytes <= 0 else int(state.used_bytes * 10_000 / state.capacity_bytes)


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
     attrgetter("models_loaded")),
    ("modelmesh_models_with_failure_total", "", "Total number of models with recent load failures",
     attrgetter("models_with_failure")),
    ("modelmesh_models_managed_total", "", "Total number of models managed", attrgetter("models_managed")),
    ("meshserve_requests_queued", "", "Inference requests waiting on this node for a model's load or for a "
     "free run slot of its copy", attrgetter("requests_queued")),
)  # fmt: skip


class _LocalHistogram:
    """Fixed-bucket histogram in milliseconds, also its own prometheus_client collector."""

    __slots__ = ("name", "help", "bounds", "les", "counts", "sum", "_zeros")

    def __init__(self, name: str, help_text: str, bounds: tuple[float, ...],
                 zeros: Callable[[], int] | None = None) -> None:
        """`zeros`: observations of 0 counted elsewhere as a plain int (cheaper than `observe(0)` on a hot
        path), added to the first bucket when scraped."""
        self.name = name
        self.help = help_text
        self.bounds = bounds
        # repr(float) matches the Go-style ``le`` strings prometheus_client emits for bounds below 1e16.
        self.les = (*(repr(float(b)) for b in bounds), "+Inf")
        self.counts = [0] * (len(bounds) + 1)  # last slot is the +Inf overflow
        self.sum = 0.0
        self._zeros = zeros

    def observe(self, value: float) -> None:
        # bisect_left puts a value equal to a bound in that bound's slot, matching Prometheus' ``le``.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        counts = self.counts if self._zeros is None else [self.counts[0] + self._zeros(), *self.counts[1:]]
        buckets = list(zip(self.les, accumulate(counts), strict=True))
        yield HistogramMetricFamily(self.name, self.help, buckets, self.sum, unit="milliseconds")


class NodeMetrics:
    """One node's metrics: plain-int counters, cheap histograms, gauges from a state callback.

    Counters are public ints, incremented by the caller (``metrics.cache_hits += 1``); the ``observe_*``
    methods record milliseconds only and do not touch the counters. No labels: a mesh holds ~100K models.
    """

    def __init__(self) -> None:
        self.invoke_count = 0
        self.invoke_failures = 0
        self.api_requests = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.loads = 0
        self.load_failures = 0
        self.unloads = 0
        self.unload_failures = 0
        self.evictions = 0
        self.etcd_writes = 0  # the etcd store's count, as of the last scrape
        self.requests_rejected = 0
        self.hops_stripped = 0  # forged or unauthenticated hops (meshnode.api.inference)
        # Requests that ran without waiting (a free run slot on a loaded copy): the queue delay histogram's
        # zeros, bumped as an int on the hit path.
        self.ran_without_waiting = 0

        hist = _LocalHistogram
        self._invoke = hist(
            "modelmesh_invoke_model_milliseconds", "Internal inference request time", _MS_BUCKETS
        )
        self._api = hist("modelmesh_api_request_milliseconds", "External inference request time", _MS_BUCKETS)
        self._cache_miss = hist("modelmesh_cache_miss_milliseconds", "Cache miss delay", _MS_BUCKETS)
        self._load = hist("modelmesh_loadmodel_milliseconds", "Time taken to load model", _MS_BUCKETS)
        self._unload = hist("modelmesh_unloadmodel_milliseconds", "Time taken to unload model", _MS_BUCKETS)
        self._eviction_age = hist(
            "modelmesh_age_at_eviction_milliseconds",
            "Time since model was last used when evicted",
            _AGE_BUCKETS_MS,
        )
        self._queue_delay = hist(
            "modelmesh_req_queue_delay_milliseconds",
            "Time a request waited on this node before it ran: for its model's load, then for a run slot",
            _MS_BUCKETS,
            zeros=lambda: self.ran_without_waiting,
        )

        self._scrape_state: NodeState | None = None

        # Private registry and provider so several nodes (or tests) can coexist in one process.
        self._registry = CollectorRegistry()
        histograms = (self._invoke, self._api, self._cache_miss, self._load, self._unload, self._eviction_age,
                      self._queue_delay)
        for histogram in histograms:
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
        for name, unit, help_text, read in _GAUGES:
            meter.create_observable_gauge(
                name, callbacks=[self._gauge_callback(read)], unit=unit, description=help_text
            )

    def observe_invoke_ms(self, ms: float) -> None:
        self._invoke.observe(ms)

    def observe_api_ms(self, ms: float) -> None:
        self._api.observe(ms)

    def observe_cache_miss_ms(self, ms: float) -> None:
        self._cache_miss.observe(ms)

    def observe_load_ms(self, ms: float) -> None:
        self._load.observe(ms)

    def observe_unload_ms(self, ms: float) -> None:
        self._unload.observe(ms)

    def observe_eviction_age_ms(self, ms: float) -> None:
        self._eviction_age.observe(ms)

    def observe_queue_delay_ms(self, ms: float) -> None:
        """A request that waited (for a load or a run slot) before it ran; one that did not wait is counted
        by `ran_without_waiting += 1` instead."""
        self._queue_delay.observe(ms)

    def render(self, state: NodeState | None = None) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every metric of this node; gauges only with
        a `state` (one snapshot, so that all gauges of one scrape describe the same moment)."""
        self._scrape_state = state
        if state is not None:
            self.etcd_writes = state.etcd_writes
        try:
            return generate_latest(self._registry)
        finally:
            self._scrape_state = None

    def _counter_callback(self, attr: str) -> _Callback:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return (Observation(getattr(self, attr)),)

        return observe

    def _gauge_callback(self, read: Callable[[NodeState], float | None]) -> _Callback:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            value = None if self._scrape_state is None else read(self._scrape_state)
            return () if value is None else (Observation(value),)

        return observe


class MetricsServer:
    """A bound /metrics listener on the running event loop."""

    def __init__(self, server: asyncio.Server, connections: set[asyncio.Task[None]]) -> None:
        self._server = server
        self._connections = connections
        self.port: int = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()


async def serve_metrics(metrics: NodeMetrics, host: str, port: int,
                        state: Callable[[], NodeState] | None = None) -> MetricsServer:
    """Serve ``GET /metrics`` on host:port (0 picks a free port, see ``.port``); `state` is read once
    per scrape (it may walk every model record).

    Runs on the caller's loop: a render is pure Python, which a thread would not take off the loop
    under the GIL anyway, and staying on the loop keeps scrapes race-free with the hot path.
    """
    connections: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # asyncio runs stream callbacks inside a task
        connections.add(task)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            writer.write(_respond(metrics, state, head))
            await asyncio.wait_for(writer.drain(), _READ_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # the peer stalled, vanished or sent an oversized head: not a scraper worth answering
        finally:
            connections.discard(task)
            writer.close()

    server = await asyncio.start_server(handle, host, port, limit=_MAX_REQUEST_HEAD)
    return MetricsServer(server, connections)


def _respond(metrics: NodeMetrics, state: Callable[[], NodeState] | None, head: bytes) -> bytes:
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _response("400 Bad Request", b"bad request\n")
    if parts[0] != b"GET" or parts[1].split(b"?", 1)[0] != b"/metrics":
        return _response("404 Not Found", b"not found\n")
    try:
        return _response("200 OK", metrics.render(state() if state is not None else None), CONTENT_TYPE_PLAIN_0_0_4)
    except Exception:
        # A broken state source must cost one scrape, not the endpoint.
        _log.exception("rendering /metrics failed")
        return _response("500 Internal Server Error", b"render failed\n")


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return (head + "Connection: close\r\n\r\n").encode("ascii") + body
