"""Applies the mesh's copy decisions (placement.copies) from this node, every few seconds.

For the models this node holds: extra copies when hot, a second copy for repeatedly used models,
min_copies; each added copy is claimed in the model record (compare-and-set, so holders deciding
at once converge) and then loaded by the chosen peer. A cooled-down extra copy here goes only
after another loaded copy answered a readiness probe, and only if the record still lists it.
Proactive loads: models without a copy that placement would put here, loaded into free space.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace

from meshnode.background import BackgroundTasks, Periodic
from meshnode.errors import ModelNotFound, ModelUnavailable
from meshnode.etcd.types import EtcdError
from meshnode.mesh.state import MeshState
from meshnode.net.peers import GrpcPeers
from meshnode.serving.cache import ModelCache
from meshnode.serving.replica import LocalReplica
from meshnode.state.registry import NO_COPY, Copy, ModelRecord, Registry
from placement.copies import CopyConfig, CopyLoad, plan_copy_changes, plan_proactive_loads
from placement.policy import active_failures, choose_load_target, load_exclusions
from placement.types import LOADED, LOADING, NodeView
from router.errors import MeshError, NoPlacement, PeerError

log = logging.getLogger(__name__)
PROACTIVE_EVERY = 6  # rounds: proactive candidates are a scan of every record, so less often
LOAD_BUDGET_S = 120.0


class CopyManager:
    def __init__(self, *, cache: ModelCache, mesh: MeshState, registry: Registry, peers: GrpcPeers,
                 replica: LocalReplica, config: CopyConfig, interval_s: float, proactive: bool,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        self._cache, self._mesh, self._registry = cache, mesh, registry
        self._peers, self._replica = peers, replica
        self._config, self._proactive = config, proactive
        self._now, self._rng = clock, rng or random.Random()
        self._seen: dict[str, tuple[int, float]] = {}  # key -> (requests served, when counted)
        self._rounds = Periodic("copy-manager", interval_s, self._round)
        self._round_count = 0
        self._work = BackgroundTasks()

    def start(self) -> None:
        self._rounds.start()

    async def stop(self) -> None:
        await self._rounds.stop()
        await self._work.cancel()

    async def _round(self) -> None:
        self._round_count += 1
        await self.step(proactive=self._proactive and self._round_count % PROACTIVE_EVERY == 0)

    async def step(self, proactive: bool = False) -> None:
        now, nodes, me = self._now(), self._mesh.nodes(), self._mesh.instance_id
        plan = plan_copy_changes(self._loads(now), nodes=nodes, me=me, now=now, config=self._config)
        for name, more in plan.add:
            self._work.spawn(self.add_copies(name, more))
        for name in plan.remove_here:
            self._work.spawn(self._remove_here(name))
        if proactive:
            # Only the models the plan can pick (recently used, then the first never used by name), not a view of
            # each of 100,000 registered models.
            idle = self._registry.records_idle(now - self._config.proactive_recent_s,
                                               4 * self._config.max_proactive_per_call)
            candidates = [v for r in idle if (v := self._mesh.model(r.name)) is not None]
            picks = plan_proactive_loads(candidates, nodes=nodes, now=now, rng=self._rng, config=self._config)
            for name, target in picks:
                if target == me:
                    self._work.spawn(self._load_here(name))

    def _loads(self, now: float) -> list[CopyLoad]:
        loads = []
        live = self._mesh.nodes()
        for entry in self._cache.loaded_entries():
            record = self._registry.get(entry.name)
            if record is None:
                continue
            served, counted_at = self._seen.get(entry.key, (entry.requests, entry.loaded_at))
            self._seen[entry.key] = (entry.requests, now)
            elapsed = max(now - counted_at, 1e-3)
            copies = max(1, len(record.live_copies(live)))
            # Only this copy's traffic is seen here; routing spreads a model's load over its copies.
            loads.append(CopyLoad(
                name=entry.name, rate_per_s=(entry.requests - served) / elapsed * copies,
                inflight=entry.inflight * copies, copies=copies, last_used=entry.last_used,
                first_used=entry.loaded_at, min_copies=record.min_copies, pinned=record.pinned,
            ))
        return loads

    async def add_copies(self, name: str, more: int,
                         budget_s: float = LOAD_BUDGET_S) -> tuple[int, list[MeshError]]:
        """Claim up to `more` further copies on nodes placement chooses, then load them at once.

        Returns how many loaded, and why the others did not (no node to place one on, a failed load), each
        with its status (a peer's load failure keeps the peer's: a broken file INTERNAL, no version NOT_FOUND).
        """
        targets: list[str] = []
        why: list[MeshError] = []
        for _ in range(more):
            view = self._mesh.model(name)
            if view is None:
                return 0, [ModelNotFound(f"model '{name}' is not registered")]
            now = self._now()
            holders = frozenset(c.instance_id for c in view.copies)
            target = choose_load_target(self._mesh.nodes().values(), size_bytes=view.size_bytes, now=now,
                                        rng=self._rng, exclude=holders | load_exclusions(view, now),
                                        runtime=view.runtime)
            if target is None:
                recent = "; ".join(f"{f.instance_id}: {f.message}" for f in active_failures(view, now))
                why.append(NoPlacement(f"no node to place a copy on (failed recently on {recent})" if recent
                                       else "no node to place a copy on"))
                break
            if not await self._claim_extra(name, target, len(holders) + 1):
                break
            targets.append(target)
        results = await asyncio.gather(*(self._load_on(name, target, budget_s) for target in targets))
        why += [error for error in results if error is not None]
        loaded = results.count(None)
        return loaded, why

    async def _load_on(self, name: str, target: str, budget_s: float) -> MeshError | None:
        node = self._mesh.nodes().get(target)
        if node is None:
            return ModelUnavailable(f"{target} left the mesh")
        try:
            await self._peers.load_copy(node, name, budget_s)
        except MeshError as error:
            log.warning("copy of %s on %s failed: %s", name, target, error)
            return PeerError(error.code, f"{target}: {error}", retry_elsewhere=error.retry_elsewhere)
        return None

    async def _claim_extra(self, name: str, target: str, wanted: int) -> bool:
        """Add `target` as a loading copy unless the live copies already reach `wanted`."""
        claimed = False
        live = self._mesh.nodes()

        def claim(record: ModelRecord | None) -> ModelRecord | None:
            nonlocal claimed
            claimed = False
            if record is None or len(record.live_copies(live)) >= wanted or target in record.copies:
                return record
            claimed = True
            return replace(record, copies={**record.copies, target: Copy(state=LOADING, since=self._now())})

        try:
            await self._registry.update(name, claim)
        except EtcdError as error:
            log.warning("extra copy of %s not claimed: %s", name, error)
            return False
        return claimed

    async def _remove_here(self, name: str) -> None:
        now = self._cache.wall_clock()
        if any(entry.sequences_until > now for entry in self._cache.entries(name)):
            return  # sequences open on this copy (serving.sequences) would lose their state with it
        me, live = self._mesh.instance_id, self._mesh.nodes()
        view = self._mesh.model(name)
        others = [c.instance_id for c in view.copies if c.instance_id != me and c.state == LOADED
                  and c.instance_id in live and not live[c.instance_id].shutting_down] if view else []
        confirmed = await _first_ready(self._peers, [live[o] for o in others])
        if confirmed is None:
            return
        released = False

        def release(record: ModelRecord | None) -> ModelRecord | None:
            nonlocal released
            released = record is not None and record.copies.get(confirmed, NO_COPY).get("state") == LOADED
            if not released or record is None:
                return record
            return replace(record, copies={n: c for n, c in record.copies.items() if n != me})

        try:
            await self._registry.update(name, release)
        except EtcdError as error:
            log.warning("copy of %s kept: %s", name, error)
            return
        if released:
            await self._cache.unload_model(name)

    async def _load_here(self, name: str) -> None:
        record = self._registry.get(name)
        if record is None or await self._mesh.claim_load(name, self._mesh.instance_id, frozenset()) != \
                self._mesh.instance_id:
            return
        try:
            async with self._replica.source(record, "") as source:  # a store's model: on this node's disk first
                started = self._cache.load_in_background(source, self._replica.load_options(record, source),
                                                         evict=False)
        except MeshError:
            started = False
        if not started:
            self._mesh.copy_changed(name)  # the claim stays unfulfilled: let the record be corrected


async def _first_ready(peers: GrpcPeers, nodes: list[NodeView]) -> str | None:
    """The first of `nodes` that answers a readiness probe, asked one at a time."""
    for node in nodes:
        if await peers.ready(node):
            return node.instance_id
    return None
