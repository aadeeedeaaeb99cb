"""Leaving the mesh on SIGTERM without failing a request.

1. Stop taking new loads: the instance record says shutting down (placement skips the node) and
   ServerReady turns false (load balancers stop sending here).
2. Hand off: each recently used model that only this node holds gets a copy loaded on another
   node before this one lets go of it, while this node keeps serving it.
3. Leave: revoke the lease (peers stop routing here at once), finish in-flight requests, unload.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from meshnode.mesh.state import MeshState
from meshnode.net.peers import GrpcPeers
from meshnode.serving.cache import ModelCache
from placement.policy import choose_load_target
from placement.types import LOADED
from router.errors import MeshError

log = logging.getLogger(__name__)

RECENT_S = 3600.0  # models idle longer than this are not worth moving: the next request reloads them
HANDOFF_BUDGET_S = 60.0
HANDOFF_PARALLEL = 2


def models_to_hand_off(cache: ModelCache, mesh: MeshState, now: float) -> list[str]:
    """Recently used models loaded here and nowhere else that is staying."""
    staying = {n for n, v in mesh.nodes().items() if not v.shutting_down and n != mesh.instance_id}
    names: dict[str, None] = {}  # a model with several versions loaded here is handed off once
    for entry in sorted(cache.loaded_entries(), key=lambda e: -e.last_used):
        if now - entry.last_used > RECENT_S or entry.name in names:
            continue
        view = mesh.model(entry.name)
        if view is None:
            continue
        if not any(c.instance_id in staying and c.state == LOADED for c in view.copies):
            names[entry.name] = None
    return list(names)


async def hand_off(cache: ModelCache, mesh: MeshState, peers: GrpcPeers, *, rng: random.Random | None = None,
                   clock: Callable[[], float] = time.time) -> tuple[int, int]:
    """Load elsewhere what only this node holds; returns (moved, failed). Bounded in time."""
    rng = rng or random.Random()
    names = models_to_hand_off(cache, mesh, clock())
    if not names:
        return 0, 0
    log.info("draining: handing off %d models", len(names))
    gate = asyncio.Semaphore(HANDOFF_PARALLEL)
    deadline = time.monotonic() + HANDOFF_BUDGET_S

    async def move(name: str) -> bool:
        async with gate:
            view = mesh.model(name)
            remaining = deadline - time.monotonic()
            if view is None or remaining <= 0:
                return False
            tried = {mesh.instance_id}
            for _ in range(3):
                target = choose_load_target(mesh.nodes().values(), size_bytes=view.size_bytes, now=clock(), rng=rng,
                                            exclude=frozenset(tried), runtime=view.runtime)
                if target is None:
                    return False
                node = mesh.nodes().get(target)
                if node is None:
                    tried.add(target)
                    continue
                try:
                    await peers.load_copy(node, name, max(1.0, deadline - time.monotonic()))
                    return True
                except MeshError as error:
                    log.warning("hand-off of %s to %s failed: %s", name, target, error)
                    tried.add(target)
            return False

    results = await asyncio.gather(*(move(n) for n in names))
    moved = sum(results)
    return moved, len(results) - moved
