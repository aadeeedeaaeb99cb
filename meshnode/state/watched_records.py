"""JSON records under one etcd prefix, and a local view of them that a watch keeps current.

The view (meshnode.etcd.watched) answers reads without etcd; writes go to etcd and are applied to the
view at once, at the revision they happened at, so a slower watch event never undoes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from meshnode.etcd.store import EtcdStore
from meshnode.etcd.watched import WatchedPrefix
from meshnode.state.records import JsonRecord

R = TypeVar("R", bound=JsonRecord)


class WatchedRecords(Generic[R]):
    def __init__(self, store: EtcdStore, prefix: str, record_type: type[R]) -> None:
        self._store = store
        self._prefix = prefix
        self._type = record_type
        self._watched: WatchedPrefix[R] = WatchedPrefix(store, prefix, record_type.decode)

    def key(self, name: str) -> str:
        return self._prefix + name

    # --- local view: no etcd on these paths ---

    def get(self, name: str) -> R | None:
        return self._watched.view.get(name)

    def names(self) -> list[str]:
        return list(self._watched.view)

    def records(self) -> list[R]:
        return list(self._watched.view.values())

    def add_listener(self, callback: Callable[[str, R | None], None]) -> None:
        """callback(name, record or None when removed) after each change to the view."""
        self._watched.add_listener(callback)

    async def wait_for(
        self,
        name: str,
        predicate: Callable[[R | None], bool],
        timeout: float,  # noqa: ASYNC109 - tests and the CLI want one bounded call
    ) -> R | None:
        """Wait until predicate(view's record) holds; DeadlineExceeded after timeout seconds."""
        return await self._watched.wait_for(name, predicate, timeout)

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
        self._watched.apply(name, record, found[1])
        return record, found[1]

    async def delete(self, name: str) -> bool:
        revision = await self._store.delete(self.key(name))
        if revision is None:
            return False
        self._watched.apply(name, None, revision)
        return True

    def _applied(self, name: str, record: R | None, revision: int | None) -> int | None:
        """A write's outcome into the view: `revision` is where it happened, None if it did not."""
        if revision is not None:
            self._watched.apply(name, record, revision)
        return revision
