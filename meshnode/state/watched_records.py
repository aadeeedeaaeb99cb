"""JSON records under one etcd prefix, and a local view of them that a watch keeps current.

The view (meshnode.etcd.watched) answers reads without etcd; writes go to etcd and are applied to the
view at once, at the revision they happened at, so a slower watch event never undoes them. How the view
holds each record (decoded, or compact until used) is its `holding` (meshnode.state.compact).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from meshnode.etcd.store import EtcdStore
from meshnode.etcd.watched import WatchedPrefix
from meshnode.state.compact import Holding, Plain, RecordView
from meshnode.state.records import JsonRecord

log = logging.getLogger(__name__)
R = TypeVar("R", bound=JsonRecord)


class WatchedRecords(Generic[R]):
    def __init__(self, store: EtcdStore, prefix: str, record_type: type[R], holding: Holding[R] | None = None) -> None:
        self._store = store
        self._prefix = prefix
        self._type = record_type
        self._holding: Holding[R] = holding if holding is not None else Plain(record_type)
        self._watched: WatchedPrefix[R | bytes] = WatchedPrefix(store, prefix, self._holding.held)
        self._view = RecordView(self._watched.view, self._holding)
        self._listeners: list[Callable[[str, R | None], None]] = []

    def key(self, name: str) -> str:
        return self._prefix + name

    # --- local view: no etcd on these paths ---

    @property
    def view(self) -> Mapping[str, R]:
        """The view itself, kept current in place: for the request path, where `view.get(name)` is one dict get
        (no call of `get`)."""
        return self._view

    def get(self, name: str) -> R | None:
        return self._view.get(name)

    def names(self) -> list[str]:
        return list(self._watched.view)

    def records(self) -> list[R]:
        opened = self._holding.opened
        return [opened(name, held) for name, held in self._watched.view.items()]

    def add_listener(self, callback: Callable[[str, R | None], None]) -> None:
        """callback(name, record or None when removed) after each change to the view."""
        if not self._listeners:
            self._watched.add_listener(self._tell)
        self._listeners.append(callback)

    def _tell(self, name: str, held: R | bytes | None) -> None:
        # One record opened for all listeners: a listing of a million records opens a million, not four.
        record = None if held is None else self._holding.opened(name, held)
        for callback in self._listeners:
            try:
                callback(name, record)
            except Exception:
                log.exception("listener of %s failed for %r", self._prefix, name)

    async def wait_for(
        self,
        name: str,
        predicate: Callable[[R | None], bool],
        timeout: float,  # noqa: ASYNC109 - tests and the CLI want one bounded call
    ) -> R | None:
        """Wait until predicate(view's record) holds; DeadlineExceeded after timeout seconds."""
        opened = self._holding.opened

        def record(held: R | bytes | None) -> R | None:
            return None if held is None else opened(name, held)

        return record(await self._watched.wait_for(name, lambda held: predicate(record(held)), timeout))

    async def start(self) -> None:
        await self._watched.start()

    async def stop(self) -> None:
        await self._watched.stop()

    # --- etcd ---

    async def read(self, name: str) -> tuple[R | None, int]:
        """The record as etcd has it now (linearizable), and its mod_revision (0: absent); the view
        is refreshed with it."""
        found = await self._store.get(self.key(name))
        if found is None:
            return None, 0
        record = self._type.decode(name, found[0])
        self._watched.apply(name, None if record is None else self._holding.held_record(record), found[1])
        return record, found[1]

    async def delete(self, name: str) -> bool:
        revision = await self._store.delete(self.key(name))
        if revision is None:
            return False
        self._watched.apply(name, None, revision)
        return True

    def _applied_raw(self, name: str, raw: bytes, revision: int) -> None:
        """_applied for a write of `raw`, which the caller has encoded already."""
        held = self._holding.held(name, raw)
        if held is not None:
            self._watched.apply(name, held, revision)

    def _applied(self, name: str, record: R | None, revision: int | None) -> int | None:
        """A write's outcome into the view: `revision` is where it happened, None if it did not."""
        if revision is not None:
            self._watched.apply(name, None if record is None else self._holding.held_record(record), revision)
        return revision
