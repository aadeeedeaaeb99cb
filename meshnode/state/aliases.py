"""Aliases (ModelMesh's vmodels): names that clients send requests to, each pointing at one model.

Records live under `aliases/<alias>` in etcd. Every node follows them in a watched view and keeps
`targets`, a plain alias -> model dict, for the request path: it is read only on a cache miss, so
requests for model names pay nothing. A switch to another model is one etcd transaction
(meshnode.control.alias_switch), so each node's view moves from the old model to the new in one step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from meshnode.etcd.store import EtcdStore
from meshnode.state.records import JsonRecord
from meshnode.state.registry import key_of as model_key
from meshnode.state.watched_records import WatchedRecords

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



class Aliases(WatchedRecords[AliasRecord]):
    def __init__(self, store: EtcdStore) -> None:
        super().__init__(store, PREFIX, AliasRecord)
        self.targets: dict[str, str] = {}
        # model -> aliases whose model or switch in progress it is; alias -> those models
        self._referrers: dict[str, set[str]] = {}
        self._refers_to: dict[str, tuple[str, ...]] = {}
        self.add_listener(self._on_change)

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

    def pointing_at(self, model: str) -> list[str]:
        """Aliases whose model, or switch in progress, is `model`."""
        return sorted(self._referrers.get(model, ()))

    # --- writes, reflected in the view at once ---

    async def write(self, record: AliasRecord, revision: int) -> int | None:
        """Put the record if it is still at `revision` (0: absent); its new revision, or None."""
        key = self.key(record.alias)
        return self._applied(record.alias, record, await self._store.compare_and_put(key, record.to_json(), revision))

    async def switch(self, record: AliasRecord, revision: int) -> int | None:
        """write(), in the same transaction as a check that the target model is still registered."""
        key = self.key(record.alias)
        written = await self._store.commit({key: record.to_json()}, unchanged={key: revision},
                                           present=[model_key(record.model)])
        return self._applied(record.alias, record, written)
