"""The node's cache of loaded models: byte capacity, LRU eviction, single-flight loads.

Hot path: `ready` is a plain dict from (model name, requested version) to a loaded entry, and
`release` is an OrderedDict.move_to_end, so a cache hit costs two dict operations. Everything
else (loads, eviction, failures) happens on the miss path.

Requests waiting for a copy (its load or a run slot) are bounded and timed by serving.waiting.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

from meshnode.background import BackgroundTasks
from meshnode.errors import LoadFailed, ModelNotFound, ModelUnavailable, ResourceExhausted
from meshnode.observability.metrics import NodeMetrics
from meshnode.observability.tracing import Tracing
from meshnode.runtimes.base import LoadedModel, Runtime
from meshnode.serving.entries import CachedModel, CacheStats, LoadOptions
from meshnode.serving.load_failures import LoadFailures
from meshnode.serving.load_queue import LoadQueue, priority
from meshnode.serving.waiting import CopyQueues
from meshnode.storage.repository import ModelSource
from placement.eviction import Resident, plan_eviction
from router.errors import MeshError

log = logging.getLogger(__name__)
REUSE_PROTECTED_FRACTION = 0.5  # chosen by `meshserve simulate` over the synthetic workloads


class ModelCache:
    def __init__(
        self,
        runtime: Runtime,
        *,
        capacity_bytes: int,
        metrics: NodeMetrics,
        load_timeout_s: float,
        failure_backoff_s: float,
        load_concurrency: int = 2,
        churn_guard_s: float = 0.0,
        runs_per_copy: int = 2,
        max_queued: int = 32,
        wall_clock: Callable[[], float] = time.time,
        tracing: Tracing | None = None,
    ) -> None:
        self.ready: dict[tuple[str, str], CachedModel] = {}
        self._tracing = tracing  # None: tracing is off
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._runtime = runtime
        self._metrics = metrics
        self._load_timeout_s = load_timeout_s
        self._churn_guard_s = churn_guard_s
        # Eviction protects models used again since their load within this share of the capacity
        # (placement.eviction): a model loaded for one request goes before one in steady use.
        self._protect_reused_bytes = int(capacity_bytes * REUSE_PROTECTED_FRACTION)
        self._reused_bytes = 0
        self.loads = LoadQueue(load_concurrency)
        self._now = wall_clock
        self.wall_clock = wall_clock  # for parts that keep times the cache compares (serving.sequences)
        self._lru: OrderedDict[str, CachedModel] = OrderedDict()  # oldest first
        self._by_name: dict[str, set[str]] = {}
        self.failures = LoadFailures(failure_backoff_s, wall_clock)
        self._background = BackgroundTasks()
        self._loading = 0  # entries whose load has not finished: read 4x a second, so counted
        self._listeners: list[Callable[[str], None]] = []
        self.queues = CopyQueues(metrics, runs_per_copy=runs_per_copy, max_queued=max_queued)
        self._runs_per_copy = runs_per_copy  # read on every release
        # Every entry's `inflight` changes under this lock: the threaded server's local hits
        # (serving.threaded_hits) count on its worker threads, everything else on the loop.
        self.inflight_lock = threading.Lock()

    def add_listener(self, callback: Callable[[str], None]) -> None:
        """callback(model name) whenever a copy here starts loading, loads, fails or goes."""
        self._listeners.append(callback)

    def _changed(self, name: str) -> None:
        for callback in self._listeners:
            callback(name)

    # -- hot path -------------------------------------------------------------------------
    def take(self, entry: CachedModel) -> None:
        """Count one more request on the entry (released by `release`)."""
        with self.inflight_lock:
            entry.inflight += 1

    def release(self, entry: CachedModel) -> None:
        with self.inflight_lock:
            entry.inflight -= 1
            left = entry.inflight
        self.finished(entry, left)

    def finished(self, entry: CachedModel, left: int, served: bool = True) -> None:
        """On the loop: a request on the entry ended, leaving `left` in flight (already counted down); not
        `served`: it found the copy unloaded and went elsewhere."""
        if left >= self._runs_per_copy:  # the slot goes to the oldest request waiting for one
            self.queues.slot_freed(entry)
        if served:
            entry.requests += 1
            if entry.requests == 2 and not entry.discarded:  # used again since its load: now reuse-protected
                self._reused_bytes += entry.size_bytes
            entry.last_used = self._now()
        if not entry.discarded:
            self._lru.move_to_end(entry.key)
        elif left == 0 and entry.drained is not None:
            entry.drained.set()

    # -- miss path ------------------------------------------------------------------------
    @property
    def load_timeout_s(self) -> float:
        """A load's timeout unless its model's record sets one."""
        return self._load_timeout_s

    async def acquire(self, source: ModelSource, requested_version: str, options: LoadOptions) -> CachedModel:
        """The loaded entry for `source`, loading it once however many callers wait.

        The caller must `release` the entry. Raises the load's error to every waiter.
        """
        key = f"{source.name}@{source.version}"
        entry = self._lru.get(key)
        if entry is None:
            try:
                self.failures.check(source.name, source.version)
                entry = self._start_load(key, source, options, waiting=True)
            except MeshError:
                # A claim for this node may already be in the model record: let it be corrected.
                self._changed(source.name)
                raise
        started = time.perf_counter()
        waited = entry.model is None
        if waited:
            await self.queues.wait_for_load(entry)
            self._metrics.cache_misses += 1
            self._metrics.observe_cache_miss_ms((time.perf_counter() - started) * 1000.0)
        else:
            self._metrics.cache_hits += 1
        if entry.discarded:
            raise ModelNotFound.unknown(source.name)
        self.queues.admitted(entry, started, waited)
        self.take(entry)
        alias = (source.name, requested_version)
        if alias not in self.ready:
            self.ready[alias] = entry
            entry.aliases.append(alias)
        return entry

    def load_in_background(self, source: ModelSource, options: LoadOptions, *, evict: bool) -> bool:
        """Start a load nobody waits for (extra copy, proactive load, drain hand-off).

        False when a copy is here already, it failed recently, or there is no room (and `evict`
        is off, or eviction would take what the churn guard protects).
        """
        key = f"{source.name}@{source.version}"
        if key in self._lru or self.failures.active(source.name, source.version):
            return False
        if not evict and options.predicted_bytes > self.capacity_bytes - self.used_bytes:
            return False
        try:
            self._start_load(key, source, options, waiting=False)
        except ResourceExhausted:
            return False
        return True

    def _start_load(self, key: str, source: ModelSource, options: LoadOptions, *, waiting: bool) -> CachedModel:
        predicted_bytes = options.predicted_bytes
        if predicted_bytes > self.capacity_bytes:
            raise ResourceExhausted(
                f"model '{source.name}' version {source.version} needs about {predicted_bytes} bytes, "
                f"more than this node's whole capacity of {self.capacity_bytes} bytes"
            )
        self._make_room(predicted_bytes, source.name, guard=options.churn_guard)
        now = self._now()
        entry = CachedModel(key, source.name, source.version, predicted_bytes, now, now, pinned=options.pinned)
        entry.loaded = asyncio.get_running_loop().create_future()
        # Waiters may all have gone (deadline); the outcome is still consumed, never "unretrieved".
        entry.loaded.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._lru[key] = entry
        self._by_name.setdefault(source.name, set()).add(key)
        self.used_bytes += predicted_bytes
        self._loading += 1
        rank = priority(waiting, options.last_used)
        timeout_s = options.timeout_s or self._load_timeout_s
        queued = time.perf_counter()
        self._background.spawn(self.loads.run(rank, lambda: self._load(entry, source, timeout_s, queued)))
        self._changed(source.name)
        return entry

    def _make_room(self, needed: int, for_model: str, keep: CachedModel | None = None, guard: bool = False) -> None:
        now = self._now()
        residents = (
            Resident(k, e.size_bytes, e.inflight > 0 or e.model is None or e is keep or e.sequences_until > now,
                     last_used=e.last_used, pinned=e.pinned, reused=e.requests >= 2)
            for k, e in self._lru.items()
        )
        idle = self._churn_guard_s if guard else 0.0
        plan = plan_eviction(residents, needed_bytes=needed, free_bytes=self.capacity_bytes - self.used_bytes,
                             now=now, min_victim_idle_s=idle, reused_bytes=self._reused_bytes,
                             protect_reused_bytes=self._protect_reused_bytes)
        if plan is None:
            protected = f", pinned, or used in the last {idle:g}s (churn guard)" if idle else " or pinned"
            raise ResourceExhausted(
                f"no room for model '{for_model}' ({needed} bytes) on this node: {self.used_bytes} of "
                f"{self.capacity_bytes} bytes are held by models in use, loading{protected}"
            )
        for victim in plan.victims:
            self._evict(self._lru[victim])

    async def _load(self, entry: CachedModel, source: ModelSource, timeout_s: float, queued: float) -> None:
        """Runs when the load queue gives it a slot (`queued`: perf_counter when it joined the queue)."""
        assert entry.loaded is not None
        if entry.discarded:  # unloaded while it queued (its waiters may have been told already)
            if not entry.loaded.done():
                entry.loaded.set_result(None)
            return
        started = time.perf_counter()
        queued_ms = (started - queued) * 1000.0
        self._metrics.observe_loading_queue_delay_ms(queued_ms)
        loading = self._runtime.load(source)
        # Started inside the load's span when tracing: what the runtime calls (Triton) continues the trace.
        load = asyncio.ensure_future(loading if self._tracing is None
                                     else self._tracing.load(loading, entry.name, entry.version, queued_ms))
        try:
            model = await asyncio.wait_for(asyncio.shield(load), timeout_s)
        except TimeoutError:
            load.add_done_callback(self._unload_when_done)
            self._fail(entry, ModelUnavailable(
                f"loading model '{entry.name}' version {entry.version} timed out after {timeout_s:g}s"))
            return
        except MeshError as error:
            self._fail(entry, error)
            return
        except Exception as error:  # a runtime bug must fail this model, not the node
            log.exception("load of %s failed", entry.key)
            self._fail(entry, LoadFailed(f"failed to load model '{entry.name}' version {entry.version}: {error}"))
            return
        self._metrics.loads += 1
        self._metrics.observe_load((time.perf_counter() - started) * 1000.0, model.size_bytes)
        if entry.discarded:
            self._background.spawn(self._unload(model))
            if not entry.loaded.done():
                entry.loaded.set_result(None)
            return
        self.used_bytes += model.size_bytes - entry.size_bytes
        entry.size_bytes = model.size_bytes
        entry.model = model
        self._loading -= 1
        if model.size_bytes > self.capacity_bytes:
            self._remove(entry)
            self._background.spawn(self._unload(model))
            self._fail(entry, ResourceExhausted(
                f"model '{entry.name}' version {entry.version} measured {model.size_bytes} bytes once "
                f"loaded, more than this node's whole capacity of {self.capacity_bytes} bytes"))
            return
        if self.used_bytes > self.capacity_bytes:
            try:  # the measured size exceeded the prediction: evict others to get back in bounds
                self._make_room(0, entry.name, keep=entry)
            except ResourceExhausted:
                log.warning("over capacity by %d bytes after loading %s", self.used_bytes - self.capacity_bytes,
                            entry.key)
        entry.loaded_at = self._now()
        entry.loaded.set_result(None)
        self._changed(entry.name)

    def _fail(self, entry: CachedModel, error: MeshError) -> None:
        self._metrics.load_failures += 1
        self._remove(entry)
        self.failures.record(entry.name, entry.version, error)
        assert entry.loaded is not None
        if not entry.loaded.done():
            entry.loaded.set_exception(error)

    # -- eviction and unload ----------------------------------------------------------------
    def _remove(self, entry: CachedModel) -> None:
        if self._lru.pop(entry.key, None) is None:
            return
        if entry.model is None:
            self._loading -= 1
        self.used_bytes -= entry.size_bytes
        if entry.requests >= 2:
            self._reused_bytes -= entry.size_bytes
        keys = self._by_name.get(entry.name)
        if keys is not None:
            keys.discard(entry.key)
            if not keys:
                del self._by_name[entry.name]
        for alias in entry.aliases:
            if self.ready.get(alias) is entry:
                del self.ready[alias]
        entry.aliases.clear()
        entry.discarded = True
        self._changed(entry.name)

    def _evict(self, entry: CachedModel) -> None:
        self._metrics.evictions += 1
        self._metrics.observe_eviction_age_ms(max(0.0, self._now() - entry.last_used) * 1000.0)
        log.info("evicting %s (%d bytes, idle %.1fs)", entry.key, entry.size_bytes, self._now() - entry.last_used)
        self._drop(entry)

    def _drop(self, entry: CachedModel) -> None:
        self._remove(entry)
        if entry.model is not None:
            self._background.spawn(self._unload(entry.model))

    def clear_failures(self) -> None:
        """Forget every recent load failure here (the runtime was reset); their records are told too."""
        for name in self.failures.clear_all():
            self._changed(name)

    def forget_all(self) -> int:
        """The runtime went away with every model: stop counting on any copy here (loads under way fail
        on their own); nothing is unloaded from a runtime that is not there. Returns how many went."""
        entries = list(self._lru.values())
        for entry in entries:
            self._remove(entry)
            if entry.loaded is not None and not entry.loaded.done():  # its waiters go elsewhere
                entry.loaded.set_exception(ModelUnavailable(
                    f"model '{entry.name}' version {entry.version} was loading when this node's runtime went away"))
        return len(entries)

    def forget(self, entry: CachedModel) -> None:
        """The runtime lost this loaded model: stop counting on it; whatever the runtime still holds goes."""
        if not entry.discarded:
            log.warning("%s is gone from the runtime; it loads again when asked for", entry.key)
            self._drop(entry)

    async def unload_model(self, name: str, drain_timeout_s: float = 30.0) -> int:
        """Stop serving every version of `name` here, wait for its requests, then unload."""
        entries = [self._lru[k] for k in self._by_name.get(name, ())]
        for entry in entries:
            self._remove(entry)
        for entry in entries:
            if entry.inflight > 0:
                entry.drained = asyncio.Event()
                try:
                    await asyncio.wait_for(entry.drained.wait(), drain_timeout_s)
                except TimeoutError:
                    log.warning("unloading %s with %d requests still in flight", entry.key, entry.inflight)
            if entry.model is not None:
                await self._unload(entry.model)
        return len(entries)

    async def _unload(self, model: LoadedModel) -> None:
        started = time.perf_counter()
        try:
            await self._runtime.unload(model)
        except Exception:
            self._metrics.unload_failures += 1  # one attempt per copy: each failure is both
            self._metrics.unload_attempt_failures += 1
            log.exception("unload of %s@%s failed", model.name, model.version)
            return
        self._metrics.unloads += 1
        self._metrics.observe_unload_ms((time.perf_counter() - started) * 1000.0)

    def _unload_when_done(self, load: asyncio.Future[LoadedModel]) -> None:
        if not load.cancelled() and load.exception() is None:
            self._background.spawn(self._unload(load.result()))

    # -- views ------------------------------------------------------------------------------
    def has_entry(self, name: str, version: str) -> bool:
        """A copy of the model here, loaded or loading ('' = any version)."""
        if version:
            return f"{name}@{version}" in self._lru
        return name in self._by_name

    def loaded_entries(self) -> Iterator[CachedModel]:
        return (e for e in list(self._lru.values()) if e.model is not None)

    def entries(self, name: str) -> Iterator[CachedModel]:
        for key in sorted(self._by_name.get(name, ())):
            yield self._lru[key]

    def stats(self) -> CacheStats:
        loading = self._loading
        oldest = next((e for e in self._lru.values() if e.model is not None), None)
        return CacheStats(
            capacity_bytes=self.capacity_bytes,
            used_bytes=self.used_bytes,
            models_loaded=len(self._lru) - loading,
            loads_in_progress=loading,
            lru_time_s=oldest.last_used if oldest is not None else None,
        )

    async def close(self) -> None:
        for entry in list(self._lru.values()):
            self._remove(entry)
            if entry.model is not None:
                await self._unload(entry.model)
        await self._background.cancel()
