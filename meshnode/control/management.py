"""The management service's transport-neutral core: models, aliases and nodes of the whole mesh.

Any node answers for all of it from its watched views; only writes go to etcd. Listings are
paged in name order, with the last name of a page as the token for the next.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshnode.control.alias_switch import AliasSwitch
from meshnode.control.model_control import ModelControl
from meshnode.control.registration import Registration
from meshnode.errors import InvalidInput, ModelNotFound
from meshnode.mesh.state import MeshState
from meshnode.state.aliases import Aliases, AliasRecord
from meshnode.state.registry import Copy, Failure, ModelRecord, Registry
from placement.types import NodeView

DEFAULT_PAGE = 100
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class ModelStatus:
    record: ModelRecord
    state: str  # READY, LOADING, REGISTERED, FAILED, UNAVAILABLE
    reason: str
    copies: dict[str, Copy]  # on live nodes
    failures: dict[str, Failure]  # recent load failures by node
    aliases: list[str]


class SortedNames:
    """Names in order, kept current by a view's listener: a page is a binary search and a slice, not a
    sort of 100K names (50 ms here) on the event loop that also serves inference."""

    def __init__(self, names: Iterable[str]) -> None:
        self._names = sorted(names)

    def update(self, name: str, present: bool) -> None:
        at = bisect.bisect_left(self._names, name)
        found = at < len(self._names) and self._names[at] == name
        if present and not found:
            self._names.insert(at, name)
        elif not present and found:
            del self._names[at]

    def page(self, prefix: str, size: int, token: str) -> tuple[list[str], str]:
        """Up to `size` names starting with `prefix` after `token`, and the next page's token ("" at the end)."""
        if token and not token.startswith(prefix):
            raise InvalidInput("page_token does not belong to this prefix")
        size = min(size or DEFAULT_PAGE, MAX_PAGE)
        names = self._names
        start = bisect.bisect_right(names, token) if token else bisect.bisect_left(names, prefix)
        chosen = [n for n in names[start:start + size + 1] if n.startswith(prefix)]
        if len(chosen) > size:
            return chosen[:size], chosen[size - 1]
        return chosen, ""


class Management:
    def __init__(self, *, registry: Registry, control: ModelControl, mesh: MeshState, aliases: Aliases,
                 switch: AliasSwitch) -> None:
        self._registry, self._control, self._mesh = registry, control, mesh
        self._aliases, self._switch = aliases, switch
        self._model_names = SortedNames(registry.names())
        registry.add_listener(lambda name, record: self._model_names.update(name, record is not None))
        self._alias_names = SortedNames(r.alias for r in aliases.records())
        aliases.add_listener(lambda alias, record: self._alias_names.update(alias, record is not None))

    # --- models ---

    async def register(self, registration: Registration) -> ModelStatus:
        if not registration.storage_uri:
            raise InvalidInput(f"registering '{registration.name}' needs a storage_uri")
        await self._control.register(registration)
        return self.status(registration.name)

    async def unregister(self, name: str) -> None:
        await self._control.unload(name, unregister=True)

    def status(self, name: str) -> ModelStatus:
        record = self._registry.get(name)
        if record is None:
            target = self._aliases.targets.get(name)
            hint = f" ('{name}' is an alias of '{target}')" if target is not None else ""
            raise ModelNotFound(f"model '{name}' is not registered{hint}")
        return self._status_of(record)

    def _status_of(self, record: ModelRecord) -> ModelStatus:
        copies = self._control.copies(record)
        entry = self._control.entry(record, copies)
        state = entry.state or "REGISTERED"
        if state == "UNAVAILABLE" and record.enabled:
            state = "FAILED"
        return ModelStatus(record=record, state=state, reason=entry.reason, copies=copies,
                           failures=self._control.failures(record), aliases=self._aliases.pointing_at(record.name))

    def list_models(self, prefix: str, size: int, token: str) -> tuple[list[ModelStatus], str]:
        names, next_token = self._model_names.page(prefix, size, token)
        return [self._status_of(r) for n in names if (r := self._registry.get(n)) is not None], next_token

    # --- aliases ---

    async def set_alias(self, alias: str, model: str, auto_delete: bool, budget_s: float) -> AliasRecord:
        return await self._switch.set(alias, model, auto_delete, budget_s)

    def get_alias(self, alias: str) -> AliasRecord:
        record = self._aliases.get(alias)
        if record is None:
            raise ModelNotFound(f"alias '{alias}' does not exist")
        return record

    async def delete_alias(self, alias: str) -> None:
        if not await self._aliases.delete(alias):
            raise ModelNotFound(f"alias '{alias}' does not exist")

    def list_aliases(self, prefix: str, size: int, token: str) -> tuple[list[AliasRecord], str]:
        names, next_token = self._alias_names.page(prefix, size, token)
        return [r for n in names if (r := self._aliases.get(n)) is not None], next_token

    # --- nodes ---

    def nodes(self) -> Sequence[NodeView]:
        return sorted(self._mesh.nodes().values(), key=lambda n: n.instance_id)
