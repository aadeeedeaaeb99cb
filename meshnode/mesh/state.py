"""The node's view of the mesh and its share of the shared state.

- MeshView for the router: live nodes (instance records on leases), models with their copies,
  and `claim_load`, the compare-and-set that makes concurrent misses agree on one loader.
- Copy bookkeeping: this node's entry in each model record is rewritten from the local cache's
  truth by one background flusher, so events can arrive in any order, be coalesced, or be lost
  to an etcd outage and the records still converge. Copy changes are written as they happen (they
  steer placement); last-use times are not worth an etcd write each: at most one record's last use
  is refreshed per LAST_USED_WRITE_EVERY_S (the stalest), so the request rate never drives writes.
- Janitor: when a node's lease expires, its copies are removed from model records, idempotently,
  by any node that sees it go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from meshnode.background import BackgroundTasks, cancel_and_wait
from meshnode.etcd.store import EtcdStore
from meshnode.etcd.types import EtcdError
from meshnode.etcd.watched import WatchedPrefix
from meshnode.runtimes.base import Runtime
from meshnode.serving.cache import ModelCache
from meshnode.state.instances import PREFIX as INSTANCES
from meshnode.state.instances import decode_node
from meshnode.state.registry import NO_COPY, Copy, ModelRecord, Registry
from meshnode.storage.repository import model_source
from placement.types import LOADED, LOADING, CopyView, FailureView, ModelView, NodeView
from router.errors import MeshError

log = logging.getLogger(__name__)

LAST_USED_GRANULARITY_S = 30.0  # last use is shared lazily: at most one write per model per this
LAST_USED_WRITE_EVERY_S = 5.0  # and at most one such write per node per this, whatever the request rate
# A claim settles concurrent misses; with etcd slow or down a miss proceeds unrecorded after this.
CLAIM_WAIT_S = 1.0


class MeshState:
    def __init__(self, store: EtcdStore, registry: Registry, cache: ModelCache, runtime: Runtime,
                 instance_id: str, on_node_gone: Callable[[str], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.instance_id = instance_id
        self._registry = registry
        self._cache = cache
        self._runtime = runtime
        self._now = clock
        self.instances: WatchedPrefix[NodeView] = WatchedPrefix(store, INSTANCES, decode_node)
        # Views of models in use (their records are held decoded, so the same object until they change).
        self._views: dict[str, tuple[ModelRecord, ModelView]] = {}
        self._last_use_written_at = float("-inf")
        self.flush_rounds = 0  # rounds of the copy flusher done: how a caller knows its wake was acted on
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._on_node_gone = on_node_gone
        self._background = BackgroundTasks()

    async def start(self) -> None:
        self._cache.add_listener(self.copy_changed)
        self._registry.add_listener(self._forget_view)
        self.instances.add_listener(self._on_instance)
        await self.instances.start()
        # A previous life of this node may be listed as holding copies it no longer has.
        self._dirty.update(r.name for r in self._registry.records_in_use() if self.instance_id in r.copies)
        self._wake.set()
        self._flusher = asyncio.create_task(self._flush_forever(), name="copy-flusher")
        self._reap(set(self.instances.view))

    async def stop(self) -> None:
        if self._flusher is not None:
            await cancel_and_wait(self._flusher)
        await self._background.cancel()
        await self.instances.stop()

    # -- router.ports.MeshView ----------------------------------------------------------------
    def nodes(self) -> Mapping[str, NodeView]:
        return self.instances.view

    def model(self, name: str) -> ModelView | None:
        record = self._registry.get(name)
        if record is None or not record.enabled:
            return None
        cached = self._views.get(name)
        if cached is not None and cached[0] is record:
            return cached[1]
        copies = tuple(CopyView(node, c["state"], c["since"], tuple(c.get("versions", ())))
                       for node, c in record.copies.items())
        view = ModelView(
            name=name, size_bytes=self._size_of(record), copies=copies,
            failures=tuple(FailureView(node, f["at"], f["message"]) for node, f in record.failures.items()),
            last_used=record.last_used, runtime=record.runtime,
            newest_version=max((v for c in copies for v in c.versions), key=int, default=""),
        )
        if copies or view.failures:
            self._views[name] = (record, view)
        return view

    def _forget_view(self, name: str, record: ModelRecord | None) -> None:
        self._views.pop(name, None)

    def _size_of(self, record: ModelRecord) -> int:
        def predicted() -> int:
            try:
                return self._runtime.predict_size(model_source(record.name, Path(record.storage), ""))
            except (MeshError, OSError):  # nothing loadable there: the load will say why; size as small
                return 0

        return record.effective_size(predicted)

    async def claim_load(self, name: str, target: str, exclude: frozenset[str]) -> str:
        holder = target
        live = self.instances.view

        def claim(record: ModelRecord | None) -> ModelRecord | None:
            nonlocal holder
            if record is None:
                return None
            for node in record.copies:
                if node in live and node not in exclude:
                    holder = node  # someone claimed or loaded it first: use that copy
                    return record
            holder = target
            copies = record.live_copies(live)
            copies[target] = Copy(state=LOADING, since=self._now())
            return replace(record, copies=copies)

        try:
            await asyncio.wait_for(self._registry.update(name, claim), CLAIM_WAIT_S)
        except (EtcdError, TimeoutError) as error:  # no etcd: load where placement said, unrecorded
            log.warning("load claim for %s not recorded: %s", name, error or "etcd too slow")
            return target
        return holder

    # -- this node's copies ----------------------------------------------------------------------
    def copy_changed(self, name: str) -> None:
        """The cache loaded, evicted, failed or unloaded a copy of `name`: record it soon."""
        self._dirty.add(name)
        self._wake.set()

    def _local_copy(self, name: str) -> Copy | None:
        entries = list(self._cache.entries(name))
        if not entries:
            return None
        loaded = [e for e in entries if e.model is not None]
        held = loaded or entries
        return Copy(state=LOADED if loaded else LOADING, since=min(e.loaded_at for e in held),
                    versions=sorted({e.version for e in held}, key=int))

    async def _flush_forever(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that arrives
            # as the wait completes, and stop() would wait for this task forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LAST_USED_WRITE_EVERY_S):
                    await self._wake.wait()
            self._wake.clear()
            self._mark_recently_used()
            self._mark_unrecorded()
            for name in list(self._dirty):
                self._dirty.discard(name)
                try:
                    await self._registry.update(name, self._converge)
                except EtcdError as error:
                    log.warning("copy of %s not recorded yet: %s", name, error)
                    self._dirty.add(name)
                    await asyncio.sleep(1.0)
                    break
            self.flush_rounds += 1

    def _converge(self, record: ModelRecord | None) -> ModelRecord | None:
        if record is None:
            return None
        me, mine = self.instance_id, self._local_copy(record.name)
        copies = dict(record.copies)
        if mine is None:
            copies.pop(me, None)
        else:
            known = copies.get(me, NO_COPY)
            if known.get("state") != mine["state"] or known.get("versions") != mine["versions"]:
                copies[me] = mine
        failures = dict(record.failures)
        failure = self._cache.failures.newest(record.name)
        if failure is not None:
            failures[me] = failure
        else:  # loaded since, or the failure's backoff here is over (or was cleared): placement may try again
            failures.pop(me, None)
        # The newest version's size: what a request without a version loads.
        entry = max((e for e in self._cache.entries(record.name) if e.model is not None),
                    key=lambda e: int(e.version), default=None)
        size = entry.size_bytes if entry is not None else record.size_bytes
        last_used = record.last_used
        if entry is not None and (last_used is None or entry.last_used - last_used >= LAST_USED_GRANULARITY_S):
            last_used = entry.last_used
        return replace(record, copies=copies, failures=failures, size_bytes=size, last_used=last_used)

    def _mark_recently_used(self) -> None:
        """Pick the loaded model whose shared last use is the stalest, if it is time for such a write."""
        now = self._now()
        if now - self._last_use_written_at < LAST_USED_WRITE_EVERY_S:
            return
        stalest: tuple[float, str] | None = None
        for entry in self._cache.loaded_entries():
            record = self._registry.get(entry.name)
            if record is None:
                continue
            shared = float("-inf") if record.last_used is None else record.last_used
            if entry.last_used - shared >= LAST_USED_GRANULARITY_S and (stalest is None or shared < stalest[0]):
                stalest = (shared, entry.name)
        if stalest is not None:
            self._last_use_written_at = now
            self._dirty.add(stalest[1])

    def _mark_unrecorded(self) -> None:
        """Copies loaded here that their record does not list: a janitor removed them while this node's lease
        was gone (a cut link, a long pause), and the node came back under a new lease. O(copies here)."""
        me = self.instance_id
        for entry in self._cache.loaded_entries():
            record = self._registry.get(entry.name)
            if record is not None and me not in record.copies:
                self._dirty.add(entry.name)

    # -- janitor --------------------------------------------------------------------------------
    def _on_instance(self, instance_id: str, node: NodeView | None) -> None:
        if node is None and instance_id != self.instance_id:
            log.info("node %s left the mesh", instance_id)
            self._on_node_gone(instance_id)
            self._reap(set(self.instances.view))

    def _reap(self, live: set[str]) -> None:
        stale = [r.name for r in self._registry.records_in_use() if any(n not in live for n in r.copies)]
        if stale:
            self._background.spawn(self._remove_dead_copies(stale))

    async def _remove_dead_copies(self, names: list[str]) -> None:
        def without_dead(record: ModelRecord | None) -> ModelRecord | None:
            if record is None:
                return None
            live = self.instances.view
            copies = {n: c for n, c in record.copies.items() if n in live or n == self.instance_id}
            return replace(record, copies=copies) if copies != record.copies else record

        for name in names:
            try:
                await self._registry.update(name, without_dead)
            except EtcdError as error:
                log.warning("dead copies of %s not removed yet: %s", name, error)
