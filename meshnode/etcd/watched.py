"""A local view of every record under one etcd prefix, kept current by a watch.

Reads are dict lookups, so request paths never wait on etcd. Writes made through the owner are
applied at once with their revision; each key keeps the revision it was last set at, so an older
watch event arriving afterwards cannot undo them. After etcd loses history or data the view is
listed again and replaced outright.
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


class WatchedPrefix(Generic[T]):
    def __init__(self, store: EtcdStore, prefix: str, decode: Callable[[str, bytes], T | None]) -> None:
        self._store = store
        self._prefix = prefix
        self._decode = decode
        self.view: dict[str, T] = {}
        # Revision each key was last set or deleted at; deletions stay until the watch passes them.
        self._revisions: dict[str, int] = {}
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
        if revision <= self._revisions.get(key, 0):
            return  # the view already holds this change or a newer one
        self._revisions[key] = revision
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
        # Wake every waiter; the next change gets a fresh event to wait on.
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_event(self, ev: WatchEvent) -> None:
        key = ev.key[len(self._prefix) :]
        if ev.type == "put":
            self.apply(key, self._decode(key, ev.value), ev.mod_revision)
        else:
            self.apply(key, None, ev.mod_revision)
            if key not in self.view and self._revisions.get(key, 0) <= ev.mod_revision:
                # The watch is past this deletion, so no older event for the key can follow.
                del self._revisions[key]

    async def _resync(self) -> int:
        """Make the view exactly etcd's listing at revision R and return R.

        Replaced outright, not merged by revision: after etcd lost its data, revisions start
        over and would compare wrongly. A local write newer than R may vanish from the view for
        a moment; the watch from R + 1 brings it back.
        """
        entries, revision = await self._store.snapshot_prefix(self._prefix)
        listed = {e.key[len(self._prefix) :]: e for e in entries}
        self._revisions = {}
        for key in [k for k in self.view if k not in listed]:
            del self.view[key]
            self._notify(key, None)
        for key, e in listed.items():
            self._revisions[key] = e.mod_revision
            value = self._decode(key, e.value)
            if value is None:
                if self.view.pop(key, None) is not None:
                    self._notify(key, None)
            elif self.view.get(key) != value:
                self.view[key] = value
                self._notify(key, value)
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
