"""Aliases (ModelMesh's vmodels): names that clients send requests to, each pointing at one model.

Records live under `aliases/<alias>` in etcd. Every node follows them in a watched view and keeps
`targets`, a plain alias -> model dict, for the request path: it is read only on a cache miss, so
requests for model names pay nothing. A switch to another model is one etcd transaction
(meshnode.alias_switch), so each node's view moves from the old model to the new in one step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshnode.etcdstore import EtcdStore
from meshnode.json_record import JsonRecord
from meshnode.registry import key_of as model_key
from meshnode.watched import WatchedPrefix

PREFIX = "aliases/"


@dataclass
class AliasRecord(JsonRecord):
    alias: str
    model: str
    auto_delete: bool = False  # unregister a model once no alias points at it
    switching_to: str | None = None  # the target of a switch in progress
    last_error: str | None = None  # why the last switch failed; cleared by the next success
    previous_model: str | None = None
    updated_at: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)


def _key(alias: str) -> str:
    return PREFIX + alias



class Aliases:
    def __init__(self, store: EtcdStore) -> None:
        self._store = store
        self._watched: WatchedPrefix[AliasRecord] = WatchedPrefix(store, PREFIX, AliasRecord.decode)
        self.targets: dict[str, str] = {}
        # model -> aliases whose model or switch in progress it is; alias -> those models
        self._referrers: dict[str, set[str]] = {}
        self._refers_to: dict[str, tuple[str, ...]] = {}
        self._watched.add_listener(self._on_change)

    def add_listener(self, callback: Callable[[str, AliasRecord | None], None]) -> None:
        """callback(alias, record or None when deleted) after each change to the view."""
        self._watched.add_listener(callback)

    def _on_change(self, alias: str, record: AliasRecord | None) -> None:
        for model in self._refers_to.pop(alias, ()):
            referrers = self._referrers[model]
            referrers.discard(alias)
            if not referrers:
                del self._referrers[model]
        if record is None:
            self.targets.pop(alias, None)
            return
        self.targets[alias] = record.model
        switching = record.switching_to
        models = (record.model,) if switching in (None, record.model) else (record.model, switching)
        self._refers_to[alias] = models
        for model in models:
            self._referrers.setdefault(model, set()).add(alias)

    async def start(self) -> None:
        await self._watched.start()

    async def stop(self) -> None:
        await self._watched.stop()

    # --- local view ---

    def get(self, alias: str) -> AliasRecord | None:
        return self._watched.view.get(alias)

    def records(self) -> list[AliasRecord]:
        return list(self._watched.view.values())

    def pointing_at(self, model: str) -> list[str]:
        """Aliases whose model, or switch in progress, is `model`."""
        return sorted(self._referrers.get(model, ()))

    # --- etcd ---

    async def read(self, alias: str) -> tuple[AliasRecord | None, int]:
        """The record as etcd has it now, and its mod_revision (0: absent)."""
        found = await self._store.get(_key(alias))
        if found is None:
            return None, 0
        record = AliasRecord.decode(alias, found[0])
        self._watched.apply(alias, record, found[1])
        return record, found[1]

    async def write(self, record: AliasRecord, revision: int) -> int | None:
        """Put the record if it is still at `revision` (0: absent); its new revision, or None."""
        written = await self._store.compare_and_put(_key(record.alias), record.to_json(), revision)
        if written is not None:
            self._watched.apply(record.alias, record, written)
        return written

    async def switch(self, record: AliasRecord, revision: int) -> int | None:
        """write(), in the same transaction as a check that the target model is still registered."""
        written = await self._store.commit({_key(record.alias): record.to_json()},
                                           unchanged={_key(record.alias): revision},
                                           present=[model_key(record.model)])
        if written is not None:
            self._watched.apply(record.alias, record, written)
        return written

    async def delete(self, alias: str) -> bool:
        revision = await self._store.delete(_key(alias))
        if revision is None:
            return False
        self._watched.apply(alias, None, revision)
        return True
