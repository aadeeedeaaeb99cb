"""Unregistering the models only aliases kept: once marked by an alias with auto_delete, a model is
unregistered when no alias has pointed at it for a grace period.

Every node sweeps, once a second and over the marked models only (a registry listener keeps that set),
so a model is retired even if the node that moved its last alias away stops meanwhile. Two nodes
retiring one model at once is harmless: the second finds it gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from meshnode.background import Periodic
from meshnode.errors import ModelNotFound
from meshnode.state.aliases import Aliases
from meshnode.state.registry import ModelRecord, Registry
from router.errors import MeshError

log = logging.getLogger(__name__)
SWEEP_INTERVAL_S = 1.0


class Retirement:
    def __init__(self, *, registry: Registry, aliases: Aliases, unregister: Callable[[str], Awaitable[None]],
                 grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._aliases, self._unregister = aliases, unregister
        self._grace_s, self._now = grace_s, clock
        self._marked = {r.name for r in registry.records() if r.delete_when_unaliased}
        registry.add_listener(self._on_record)
        self._unreferenced_since: dict[str, float] = {}
        self._sweeps = Periodic("alias-retirement", SWEEP_INTERVAL_S, self.sweep)

    def _on_record(self, name: str, record: ModelRecord | None) -> None:
        if record is not None and record.delete_when_unaliased:
            self._marked.add(name)
        else:
            self._marked.discard(name)
            self._unreferenced_since.pop(name, None)

    def start(self) -> None:
        self._sweeps.start()

    async def stop(self) -> None:
        await self._sweeps.stop()

    async def sweep(self) -> None:
        now = self._now()
        for name in sorted(self._marked):
            if self._aliases.pointing_at(name):
                self._unreferenced_since.pop(name, None)
                continue
            if now - self._unreferenced_since.setdefault(name, now) < self._grace_s:
                continue
            try:
                await self._unregister(name)
                log.info("unregistered %s: no alias has pointed at it for %g s", name, self._grace_s)
            except ModelNotFound:
                pass  # another node retired it first
            except MeshError as error:  # it stays marked: the next sweep tries again
                log.warning("could not unregister %s after its aliases moved on: %s", name, error)
