"""Pointing an alias at a model with no failed request: load first, switch in one transaction.

1. Mark the alias `switching_to` the new model (compare-and-set: a concurrent switch of the same
   alias then loses at step 3 instead of both half-winning).
2. Load the new model with as many copies as the old one has loaded, on nodes placement chooses,
   and wait until the registry shows a loaded copy: every node can route to it from then on.
3. One etcd transaction: the alias still at the revision of step 1 and the new model still
   registered, then the alias points at the new model. Each node's view moves in one step.
4. With auto_delete, the model is then marked in its record, for meshnode.control.alias_retirement to unregister
   once no alias points at it any more. Marking after the switch means a model is never unreferenced
   and marked while its first alias is still loading it.

A failed load leaves the alias on the old model, with `last_error` saying why, and the call fails.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Container
from dataclasses import replace

from meshnode.errors import Aborted, AlreadyExists, DeadlineExceeded, InvalidInput, LoadFailed, ModelNotFound
from meshnode.mesh.copy_manager import CopyManager
from meshnode.mesh.state import MeshState
from meshnode.state.aliases import Aliases, AliasRecord
from meshnode.state.registry import ModelRecord, Registry
from meshnode.storage.repository import check_model_name
from placement.types import LOADED, LOADING

log = logging.getLogger(__name__)

# After the copies answered their loads, their nodes record them within a flush interval.
RECORDED_WITHIN_S = 5.0


class AliasSwitch:
    def __init__(self, *, aliases: Aliases, registry: Registry, mesh: MeshState, copies: CopyManager) -> None:
        self._aliases, self._registry, self._mesh, self._copies = aliases, registry, mesh, copies

    async def set(self, alias: str, model: str, auto_delete: bool, budget_s: float) -> AliasRecord:
        self._check(alias, model)
        current, revision = await self._aliases.read(alias)
        if current is not None and current.model == model:
            settled = replace(current, auto_delete=auto_delete, switching_to=None, last_error=None)
            if settled != current:
                await self._write(settled, revision)
            await self._mark(model, auto_delete)
            return settled
        if current is not None:
            revision = await self._write(replace(current, switching_to=model, last_error=None), revision)
        started = time.monotonic()
        try:
            await self._load(model, self._live_copies(current.model) if current is not None else 1, budget_s)
            remaining = budget_s - (time.monotonic() - started)
            await self._registry.wait_for(model, lambda r: r is not None and self._live_copies(model) > 0,
                                          max(0.1, min(RECORDED_WITHIN_S, remaining)))
        except (LoadFailed, DeadlineExceeded) as error:
            stays = f"alias '{alias}' stays on '{current.model}'" if current is not None else f"alias '{alias}' not set"
            if current is not None:
                await self._write(replace(current, switching_to=None, last_error=str(error)), revision, quiet=True)
            raise LoadFailed.because(f"{stays}: {error}", error) from None
        except BaseException:  # the caller went away (its deadline, Ctrl-C) or etcd failed: no stale marker
            if current is not None:
                with contextlib.suppress(Exception):
                    await self._write(replace(current, switching_to=None), revision, quiet=True)
            raise
        switched = AliasRecord(alias=alias, model=model, auto_delete=auto_delete,
                               previous_model=current.model if current is not None else None)
        if await self._aliases.switch(switched, revision) is None:
            if self._registry.get(model) is None:
                raise ModelNotFound(f"model '{model}' was unregistered during the switch of alias '{alias}'")
            raise Aborted(f"alias '{alias}' was changed by another call during the switch; it is unchanged here")
        await self._mark(model, auto_delete)
        log.info("alias %s now points at %s (was %s)", alias, model, current.model if current else None)
        return switched

    def _check(self, alias: str, model: str) -> None:
        check_model_name(alias)
        if alias == model:
            raise InvalidInput(f"alias '{alias}' cannot point at itself")
        if self._registry.get(alias) is not None:
            raise AlreadyExists(f"'{alias}' is the name of a registered model; an alias needs a name of its own")
        if model in self._aliases.targets:
            raise InvalidInput(f"'{model}' is an alias; an alias must point at a model")
        record = self._registry.get(model)
        if record is None:
            raise ModelNotFound(f"cannot point alias '{alias}' at '{model}': no such model is registered")
        if not record.enabled:
            raise InvalidInput(f"cannot point alias '{alias}' at '{model}': the model is unloaded; load it first")

    async def _mark(self, model: str, auto_delete: bool) -> None:
        if auto_delete:
            await self._registry.update(model, lambda r: replace(r, delete_when_unaliased=True) if r else None)

    def _live_copies(self, model: str, states: Container[str] = (LOADED,)) -> int:
        """The model's copies on live nodes in one of `states`, as its record says."""
        record: ModelRecord | None = self._registry.get(model)
        live = self._mesh.nodes()
        return 0 if record is None else sum(
            1 for node, copy in record.copies.items() if copy["state"] in states and node in live)

    async def _load(self, model: str, wanted: int, budget_s: float) -> None:
        """Load copies of `model` until `wanted` (at least one) are loaded; LoadFailed if none is."""
        wanted = max(1, wanted)
        # A copy recorded as loading counts (a load just done here is recorded as loaded a flush later): the
        # wait that follows _load waits for it; placing another would find no node, as it holds one already.
        have = self._live_copies(model, (LOADED, LOADING))
        if have >= wanted:
            return
        loaded, why = await self._copies.add_copies(model, wanted - have, budget_s)
        reasons = "; ".join(str(error) for error in why)
        if have + loaded == 0 and not why and self._live_copies(model, (LOADED, LOADING)):
            return  # a claim lost to a copy recorded meanwhile (a load here, recorded a flush late): it counts
        if have + loaded == 0:
            message = f"loading '{model}' failed: {reasons or 'no node could load it'}"
            if self._registry.get(model) is None:  # unregistered meanwhile: NOT_FOUND, not a broken model
                raise LoadFailed.because(message, ModelNotFound(f"model '{model}' is not registered"))
            # The target's load failure status, when every failed copy says the same (a broken file INTERNAL,
            # no such version NOT_FOUND, no room RESOURCE_EXHAUSTED); INTERNAL when they differ.
            raise LoadFailed.because(message, why[0]) if len({e.code for e in why}) == 1 else LoadFailed(message)
        if have + loaded < wanted:
            log.warning("alias target %s has %d of %d copies: %s", model, have + loaded, wanted, reasons)

    async def _write(self, record: AliasRecord, revision: int, quiet: bool = False) -> int:
        written = await self._aliases.write(replace(record, updated_at=time.time()), revision)
        if written is None:
            if quiet:
                return revision
            raise Aborted(f"alias '{record.alias}' was changed by another call; nothing was changed")
        return written
