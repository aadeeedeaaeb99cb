"""A local view of every record under one etcd prefix, kept current by a watch.

Reads are dict lookups, so request paths never wait on etcd. Writes made through the owner are
applied at once with their revision, which is remembered only until the watch has passed it: until
then an older watch event for that key cannot undo them. Watch events arrive in revision order, so
nothing per key is kept once the watch is past (a view of 1,000,000 keys holds no revisions). After
etcd loses history or data the view is listed again and replaced outright.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from meshnode.background import cancel_and_wait
from meshnode.errors import DeadlineExceeded
from meshnode.etcd.store import EtcdStore, EtcdUnavailable, WatchEvent, WatchResync

log = logging.getLogger(__name__)
T = TypeVar("T")

_PRUNE_AT = 256  # local writes awaiting their watch event before the ones it has passed are dropped


class WatchedPrefix(Generic[T]):
    def __init__(self, store: EtcdStore, prefix: str, decode: Callable[[str, bytes], T | None]) -> None:
        self._store = store
        self._prefix = prefix
        self._decode = decode
        self.view: dict[str, T] = {}
        # The newest revision the view holds from etcd's listing and watch: a local write at or below it
        # is in the view already (or something newer is).
        self._watched_to = 0
        # Local writes the watch has not delivered yet: key -> the revision written.
        self._pending: dict[str, int] = {}
        self._prune_at = _PRUNE_AT
        self._listeners: list[Callable[[str, T | None], None]] = []
        self._changed = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None

    def add_listener(self, callback: Callable[[str, T | None], None]) -> None:
        """callback(key, value or None when removed) after each change to the view."""
        self._listeners.append(callback)

    async def wait_for(
        self,
        key: str,
        predicate: Callable[[T | None], bool],
        timeout: float,  # noqa: ASYNC109 - tests and the CLI want one bounded call
    ) -> T | None:
        """Wait until predicate(view's value) holds; DeadlineExceeded after timeout seconds."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(value := self.view.get(key)):
                    if self._changed.is_set():
                        self._changed = asyncio.Event()
                    await self._changed.wait()
                return value
        except TimeoutError:
            raise DeadlineExceeded(
                f"{self._prefix}{key} did not reach the expected state within {timeout:g} s"
            ) from None

    async def start(self) -> None:
        """Load every record, then follow changes from the next revision on."""
        revision = await self._resync()
        self._watch = asyncio.create_task(self._follow(revision), name=f"watch-{self._prefix}")

    async def stop(self) -> None:
        if self._watch is not None:
            await cancel_and_wait(self._watch)
            self._watch = None

    def apply(self, key: str, value: T | None, revision: int) -> None:
        """A local write (or a linearizable read) of `key` at `revision`, into the view at once."""
        if revision <= max(self._watched_to, self._pending.get(key, 0)):
            return  # the view already holds this change or a newer one
        self._pending[key] = revision
        self._set(key, value)

    def _set(self, key: str, value: T | None) -> None:
        if value is None:
            if self.view.pop(key, None) is None:
                return
        else:
            self.view[key] = value
        self._notify(key, value)

    def _notify(self, key: str, value: T | None) -> None:
        for callback in self._listeners:
            try:
                callback(key, value)
            except Exception:
                log.exception("listener of %s failed for %r", self._prefix, key)
        # Wakes every waiter. A waiter replaces a set event before it waits, so one event serves any number of
        # changes nobody waited for (a listing of a million keys makes no event per key).
        self._changed.set()

    def _on_event(self, ev: WatchEvent) -> None:
        if ev.mod_revision < self._watched_to:
            return  # the watch never goes back: an event this old is in the view already
        key = ev.key[len(self._prefix) :]
        self._watched_to = ev.mod_revision
        written = self._pending.get(key)
        if written is not None:
            if written > ev.mod_revision:
                return  # an older state than the local write already in the view
            del self._pending[key]
            if len(self._pending) > self._prune_at:
                # Every later event is newer than writes the watch has passed. Pruned when it has doubled: a bulk
                # registration of 100,000 keys must not prune at every event.
                self._pending = {k: r for k, r in self._pending.items() if r > ev.mod_revision}
                self._prune_at = max(_PRUNE_AT, 2 * len(self._pending))
            if written == ev.mod_revision:
                return  # the local write itself, in the view already
        self._set(key, self._decode(key, ev.value) if ev.type == "put" else None)

    async def _resync(self) -> int:
        """Make the view exactly etcd's listing at revision R and return R.

        Replaced outright, not merged by revision: after etcd lost its data, revisions start
        over and would compare wrongly. A local write newer than R may vanish from the view for
        a moment; the watch from R + 1 brings it back. Applied a page at a time, yielding to the
        event loop between pages: a listing of a million keys neither sits in memory whole nor
        holds the loop for seconds.
        """
        while True:
            try:
                return await self._list()
            except WatchResync as e:
                log.info("listing %s again: %s", self._prefix, e)

    async def _list(self) -> int:
        skip = len(self._prefix)
        listed: set[str] | None = set() if self.view else None
        revision = 0
        async for entries, revision in self._store.snapshot_pages(self._prefix):
            if self._watched_to != revision:
                self._pending, self._watched_to = {}, revision
            for e in entries:
                key = e.key[skip:]
                if listed is not None:
                    listed.add(key)
                if key in self._pending:
                    continue  # written here after the listing's revision, while this loop yielded
                value = self._decode(key, e.value)
                if value is None:
                    if self.view.pop(key, None) is not None:
                        self._notify(key, None)
                elif self.view.get(key) != value:
                    self.view[key] = value
                    self._notify(key, value)
            await asyncio.sleep(0)
        if listed is not None:
            for key in [k for k in self.view if k not in listed]:
                del self.view[key]
                self._notify(key, None)
        return revision

    async def _follow(self, revision: int) -> None:
        while True:
            try:
                async for ev in self._store.watch_prefix(self._prefix, revision + 1):
                    self._on_event(ev)
            except WatchResync as e:
                log.warning("view of %s out of step with etcd (%s); listing again", self._prefix, e)
            except Exception:
                # A dead watch would freeze the view for good: log, list again, watch again.
                log.exception("watch of %s failed; listing again", self._prefix)
            revision = await self._resync_when_possible()

    async def _resync_when_possible(self) -> int:
        while True:
            try:
                return await self._resync()
            except EtcdUnavailable as e:
                log.warning("view of %s waits for etcd: %s", self._prefix, e)
                await asyncio.sleep(1.0)
