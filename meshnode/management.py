"""The management service's transport-neutral core: models, aliases and nodes of the whole mesh.

Any node answers for all of it from its watched views; only writes go to etcd. Listings are
paged in name order, with the last name of a page as the token for the next.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from meshnode.alias_switch import AliasSwitch
from meshnode.aliases import Aliases, AliasRecord
from meshnode.errors import InvalidInput, ModelNotFound
from meshnode.mesh import MeshState
from meshnode.model_control import PARAM_LAZY, PARAM_SIZE_HINT, PARAM_UNREGISTER, ModelControl
from meshnode.registry import Copy, ModelRecord, Registry
from placement.types import NodeView

DEFAULT_PAGE = 100
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class ModelStatus:
    record: ModelRecord
    state: str  # READY, LOADING, REGISTERED, FAILED, UNAVAILABLE
    reason: str
    copies: dict[str, Copy]  # on live nodes
    aliases: list[str]


@dataclass(frozen=True, slots=True)
class Registration:
    name: str
    storage_uri: str
    lazy: bool = False
    size_hint_bytes: int = 0
    pinned: bool = False
    min_copies: int = 0
    load_timeout_s: float = 0.0
    runtime: str | None = None  # None: the registering node's; "": any


def page(names: Iterable[str], prefix: str, size: int, token: str) -> tuple[list[str], str]:
    """One page of the names starting with `prefix`, after `token`; and the next page's token."""
    if size < 0:
        raise InvalidInput("page_size must not be negative")
    size = min(size or DEFAULT_PAGE, MAX_PAGE)
    if token and not token.startswith(prefix):
        raise InvalidInput("page_token does not belong to this prefix")
    ordered = sorted(n for n in names if n.startswith(prefix))
    start = bisect.bisect_right(ordered, token) if token else 0
    chosen = ordered[start:start + size]
    more = start + size < len(ordered)
    return chosen, chosen[-1] if more and chosen else ""


class Management:
    def __init__(self, *, registry: Registry, control: ModelControl, mesh: MeshState, aliases: Aliases,
                 switch: AliasSwitch) -> None:
        self._registry, self._control, self._mesh = registry, control, mesh
        self._aliases, self._switch = aliases, switch

    # --- models ---

    async def register(self, request: Registration) -> ModelStatus:
        if not request.storage_uri:
            raise InvalidInput(f"registering '{request.name}' needs a storage_uri")
        config: dict[str, Any] = {"storage_uri": request.storage_uri}
        if request.pinned:
            config["pinned"] = True
        if request.min_copies:
            config["min_copies"] = request.min_copies
        if request.load_timeout_s:
            config["load_timeout_s"] = request.load_timeout_s
        if request.runtime is not None:
            config["runtime"] = request.runtime
        params: dict[str, object] = {"config": json.dumps(config), PARAM_LAZY: request.lazy}
        if request.size_hint_bytes:
            params[PARAM_SIZE_HINT] = request.size_hint_bytes
        await self._control.load(request.name, params)
        return self.status(request.name)

    async def unregister(self, name: str) -> None:
        await self._control.unload(name, {PARAM_UNREGISTER: True})

    def status(self, name: str) -> ModelStatus:
        record = self._registry.get(name)
        if record is None:
            target = self._aliases.targets.get(name)
            hint = f" ('{name}' is an alias of '{target}')" if target is not None else ""
            raise ModelNotFound(f"model '{name}' is not registered{hint}")
        return self._status_of(record, self._aliases.pointing_at(name))

    def _status_of(self, record: ModelRecord, aliases: list[str]) -> ModelStatus:
        entry = self._control.entry(record)
        state = entry.state or "REGISTERED"
        if state == "UNAVAILABLE" and record.enabled:
            state = "FAILED"
        return ModelStatus(record=record, state=state, reason=entry.reason, copies=self._control.copies(record),
                           aliases=aliases)

    def list_models(self, prefix: str, size: int, token: str) -> tuple[list[ModelStatus], str]:
        names, next_token = page(self._registry.names(), prefix, size, token)
        by_model: dict[str, list[str]] = {}
        for alias in self._aliases.records():
            by_model.setdefault(alias.model, []).append(alias.alias)
        statuses = []
        for name in names:
            record = self._registry.get(name)
            if record is not None:
                statuses.append(self._status_of(record, sorted(by_model.get(name, []))))
        return statuses, next_token

    # --- aliases ---

    async def set_alias(self, alias: str, model: str, auto_delete: bool, budget_s: float) -> AliasRecord:
        return await self._switch.set(alias, model, auto_delete, budget_s)

    def get_alias(self, alias: str) -> AliasRecord:
        record = self._aliases.get(alias)
        if record is None:
            raise ModelNotFound(f"alias '{alias}' does not exist")
        return record

    async def delete_alias(self, alias: str) -> None:
        await self._switch.delete(alias)

    def list_aliases(self, prefix: str, size: int, token: str) -> tuple[list[AliasRecord], str]:
        names, next_token = page((r.alias for r in self._aliases.records()), prefix, size, token)
        return [r for n in names if (r := self._aliases.get(n)) is not None], next_token

    # --- nodes ---

    def nodes(self) -> Sequence[NodeView]:
        return sorted(self._mesh.nodes().values(), key=lambda n: n.instance_id)
