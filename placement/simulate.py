"""The mesh on a request trace, with no network: the real placement, routing and eviction code.

Each node is an LRU of loaded models (an OrderedDict, oldest first) with a byte capacity. A request
is a hit when a node holds the model (the copy the live router's choose_copy picks serves it; a copy
still loading makes the request wait, but starts no load). Otherwise it is a miss, placed as the live
router does: choose_load_target picks a node from the published node records; that node runs
plan_eviction with the churn guard, and a node that refuses is excluded and placement asked again,
until should_give_up says stop (the request is then rejected). Loads take time (LatencyModel), during
which the copy counts against capacity, is never evicted and shows in loads_in_progress. Requests
themselves take no time: nothing is ever in flight, so routing always picks the oldest loaded copy,
and what extra copies buy in throughput is not modelled, only what they cost in loads and capacity.

Node records are published every publish_interval_s of simulated time (the live publisher writes at
most once a second, on any change of model count), so placement decides on a view up to that old; 0
gives a fresh view at every miss. Copy changes and proactive loads, when configured, run every
plan_every_s on every node. Eviction protects the most recently reused protect_fraction of each node
(see placement.eviction), which the node tracks as the live cache would: the bytes of its copies used
again since their load.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from placement.baselines import run_belady, run_lru, run_random
from placement.copies import CopyConfig, CopyLoad, plan_copy_changes, plan_proactive_loads
from placement.eviction import Resident, plan_eviction
from placement.policy import PlacementConfig, choose_copy, choose_load_target, should_give_up
from placement.simstats import LatencyModel, Result
from placement.types import LOADED, LOADING, CopyView, ModelView, NodeView
from placement.workloads import Trace

NODE_RATE_TAU_S = 10.0  # the node's published request rate is smoothed over about this long (as live)
MODEL_RATE_TAU_S = 120.0  # a model's request rate, for copy decisions


@dataclass(frozen=True)
class SimConfig:
    nodes: int
    capacity_bytes: int  # per node
    churn_guard_s: float = 2.0  # plan_eviction's min_victim_idle_s; 0: no guard
    protect_fraction: float = 0.5  # of each node's capacity, for models reused since their load
    publish_interval_s: float = 1.0
    copies: CopyConfig | None = None  # None: one copy per model, never more
    proactive: bool = False
    plan_every_s: float = 30.0
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    latency: LatencyModel = field(default_factory=LatencyModel)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.capacity_bytes < 1:
            raise ValueError("nodes and capacity_bytes must be positive")
        if min(self.churn_guard_s, self.publish_interval_s) < 0 or self.plan_every_s <= 0:
            raise ValueError("churn_guard_s and publish_interval_s must be >= 0, plan_every_s > 0")
        if not 0 <= self.protect_fraction <= 1:
            raise ValueError("protect_fraction must be in [0, 1]")


class _Copy:
    __slots__ = ("size", "since", "ready_at", "last_use", "reused")

    def __init__(self, size: int, now: float, ready_at: float) -> None:
        self.size = size
        self.since = now
        self.ready_at = ready_at
        self.last_use = now
        self.reused = False


class _Node:
    __slots__ = ("iid", "capacity", "used", "reused", "lru", "loading", "rate", "rate_at")

    def __init__(self, iid: str, capacity: int) -> None:
        self.iid = iid
        self.capacity = capacity
        self.used = 0
        self.reused = 0  # bytes of the copies used again since their load
        self.lru: OrderedDict[str, _Copy] = OrderedDict()  # oldest use first
        self.loading = 0
        self.rate = 0.0
        self.rate_at = 0.0

    def served(self, now: float) -> None:
        self.rate = _decayed(self.rate, now - self.rate_at, NODE_RATE_TAU_S) + 1.0 / NODE_RATE_TAU_S
        self.rate_at = now

    def residents(self, now: float) -> Iterator[Resident]:
        for name, c in self.lru.items():
            yield Resident(name, c.size, c.ready_at > now, c.last_use, reused=c.reused)

    def view(self, now: float) -> NodeView:
        oldest = next((c.last_use for c in self.lru.values() if c.ready_at <= now), None)
        return NodeView(
            self.iid, self.iid, self.capacity, self.used, model_count=len(self.lru) - self.loading,
            lru_time_s=oldest, request_rate=_decayed(self.rate, now - self.rate_at, NODE_RATE_TAU_S),
            loads_in_progress=self.loading,
        )


def _decayed(rate: float, elapsed: float, tau: float) -> float:
    return rate * math.exp(-max(0.0, elapsed) / tau)


class MeshSim:
    def __init__(self, trace: Trace, config: SimConfig) -> None:
        self._trace = trace
        self._cfg = config
        self._rng = random.Random(config.seed)
        self._nodes = {f"n{i}": _Node(f"n{i}", config.capacity_bytes) for i in range(config.nodes)}
        self._view: dict[str, NodeView] = {iid: n.view(0.0) for iid, n in self._nodes.items()}
        self._holders: dict[str, list[str]] = {}  # model -> nodes with a copy, loaded or loading
        self._loads: list[tuple[float, str]] = []  # (ready at, node): loads in progress, soonest first
        self._next_publish = 0.0
        self._next_plan = config.plan_every_s
        # Model -> [rate, rate at, first use, last use] since it last had no copy: with copies only.
        self._usage: dict[str, list[float]] = {}
        self._used_since_plan: set[str] = set()
        # Models without a copy -> (last use, size): proactive load candidates.
        self._evicted: dict[str, tuple[float, int]] = {}
        self.result = Result("mesh")

    def run(self, progress: Callable[[int], None] | None = None) -> Result:
        trace, res, lat = self._trace, self.result, self._cfg.latency
        for i, (t, m) in enumerate(zip(trace.times, trace.models, strict=True)):
            if progress is not None and i % 2000 == 0:
                progress(i)
            self._advance(t)
            name, size = trace.names[m], trace.sizes[m]
            res.requests += 1
            self._note_use(name, t)
            holders = self._holders.get(name)
            if holders:
                copy = self._serve_copy(name, holders, t)
                res.hits += 1
                res.waited += copy.ready_at > t
                res.record(lat.hit_s + max(0.0, copy.ready_at - t))
                continue
            if self._cfg.publish_interval_s == 0:
                self._publish(t)
            iid = self._place(name, size, t, exclude=set())
            if iid is None:
                res.rejected += 1
                continue
            self._nodes[iid].served(t)
            res.record(lat.hit_s + lat.load_s(size))
        if progress is not None:
            progress(len(trace))
        return res

    def _serve_copy(self, name: str, holders: list[str], t: float) -> _Copy:
        copies = tuple(self._copy_view(name, iid, t) for iid in holders)
        iid = choose_copy(copies, nodes=self._view, local_outstanding={}, exclude=(), rng=self._rng)
        assert iid is not None, "every simulated node is live"
        node = self._nodes[iid]
        copy = node.lru[name]
        copy.last_use = t
        if not copy.reused:
            copy.reused = True
            node.reused += copy.size
        node.lru.move_to_end(name)
        node.served(t)
        return copy

    def _copy_view(self, name: str, iid: str, t: float) -> CopyView:
        copy = self._nodes[iid].lru[name]
        return CopyView(iid, LOADED, copy.ready_at) if copy.ready_at <= t else CopyView(iid, LOADING, copy.since)

    def _advance(self, t: float) -> None:
        """Finish loads, publish node records and run periodic plans due by `t`, in time order."""
        interval = self._cfg.publish_interval_s
        while interval and self._next_publish <= t:
            self._finish_loads(self._next_publish)
            self._publish(self._next_publish)
            self._next_publish = max(self._next_publish + interval, (t // interval) * interval)
        self._finish_loads(t)
        if (self._cfg.copies is not None or self._cfg.proactive) and self._next_plan <= t:
            self._plan(self._next_plan)
            self._next_plan = (t // self._cfg.plan_every_s + 1) * self._cfg.plan_every_s

    def _finish_loads(self, t: float) -> None:
        while self._loads and self._loads[0][0] <= t:
            self._nodes[heapq.heappop(self._loads)[1]].loading -= 1

    def _publish(self, t: float) -> None:
        self._view = {iid: n.view(t) for iid, n in self._nodes.items()}

    def _note_use(self, name: str, t: float) -> None:
        if self._cfg.copies is not None:
            usage = self._usage.setdefault(name, [0.0, t, t, t])
            usage[0] = _decayed(usage[0], t - usage[1], MODEL_RATE_TAU_S) + 1.0 / MODEL_RATE_TAU_S
            usage[1] = usage[3] = t
            self._used_since_plan.add(name)

    # -- loads and evictions ----------------------------------------------------------------------

    def _place(self, name: str, size: int, t: float, *, exclude: set[str], deliberate: bool = False) -> str | None:
        """Load `name` where placement says, as the live router would; None when every try is refused."""
        refused: set[str] = set()
        model = ModelView(name, size)
        while should_give_up(model, refused, t, self._cfg.placement) is None:
            target = choose_load_target(
                self._view.values(), size_bytes=size, now=t, rng=self._rng, exclude=exclude | refused,
                config=self._cfg.placement,
            )
            if target is None:
                return None
            node = self._nodes[target]
            plan = plan_eviction(
                node.residents(t), needed_bytes=size, free_bytes=node.capacity - node.used, now=t,
                min_victim_idle_s=self._cfg.churn_guard_s, reused_bytes=node.reused,
                protect_reused_bytes=int(node.capacity * self._cfg.protect_fraction),
            )
            if plan is None:
                refused.add(target)
                continue
            for victim in plan.victims:
                self._unload(node, victim, t)
                self.result.evictions += 1
            self._load(node, name, size, t, deliberate=deliberate)
            return target
        return None

    def _load(self, node: _Node, name: str, size: int, t: float, *, deliberate: bool) -> _Copy:
        res = self.result
        holders = self._holders.setdefault(name, [])
        res.duplicate_loads += bool(holders) and not deliberate
        copy = _Copy(size, t, t + self._cfg.latency.load_s(size))
        node.lru[name] = copy
        node.used += size
        node.loading += 1
        holders.append(node.iid)
        heapq.heappush(self._loads, (copy.ready_at, node.iid))
        res.loads += 1
        res.load_bytes += size
        res.extra_loads += deliberate
        self._evicted.pop(name, None)
        return copy

    def _unload(self, node: _Node, name: str, t: float) -> None:
        copy = node.lru.pop(name)
        node.used -= copy.size
        node.reused -= copy.size if copy.reused else 0
        holders = self._holders[name]
        holders.remove(node.iid)
        if not holders:
            del self._holders[name]
            self._usage.pop(name, None)
            if self._cfg.proactive:
                self._evicted[name] = (copy.last_use, copy.size)

    # -- periodic plans ---------------------------------------------------------------------------

    def _plan(self, t: float) -> None:
        if self._cfg.publish_interval_s == 0:
            self._publish(t)
        if self._cfg.copies is not None:
            self._plan_copies(t, self._cfg.copies)
        if self._cfg.proactive:
            self._plan_proactive(t, self._cfg.copies or CopyConfig())

    def _plan_copies(self, t: float, config: CopyConfig) -> None:
        # Models used since the last round or with extra copies: any other decides nothing new.
        candidates = self._used_since_plan | {m for m, h in self._holders.items() if len(h) > 1}
        self._used_since_plan = set()
        for node in self._nodes.values():
            loads = [
                CopyLoad(name, _decayed(u[0], t - u[1], MODEL_RATE_TAU_S), 0, len(self._holders[name]), u[3], u[2],
                         here_last_used=c.last_use)
                for name in candidates
                if (c := node.lru.get(name)) is not None and c.ready_at <= t and (u := self._usage.get(name))
            ]
            plan = plan_copy_changes(loads, nodes=self._view, me=node.iid, now=t, config=config)
            seen = {load.name: load.copies for load in loads}
            for name, more in plan.add:
                while len(self._holders.get(name, ())) < seen[name] + more:
                    holders = set(self._holders.get(name, ()))
                    if self._place(name, node.lru[name].size, t, exclude=holders, deliberate=True) is None:
                        break
            for name in plan.remove_here:
                others = [iid for iid in self._holders[name] if iid != node.iid]
                # Confirm another copy is loaded before unloading, as the live node must.
                if any(self._nodes[iid].lru[name].ready_at <= t for iid in others):
                    self._unload(node, name, t)
                    self.result.removals += 1

    def _plan_proactive(self, t: float, config: CopyConfig) -> None:
        horizon = t - config.proactive_recent_s
        self._evicted = {name: seen for name, seen in self._evicted.items() if seen[0] >= horizon}
        candidates = (ModelView(name, size, last_used=used) for name, (used, size) in self._evicted.items())
        for name, iid in plan_proactive_loads(candidates, nodes=self._view, now=t, rng=self._rng, config=config):
            node, (used, size) = self._nodes[iid], self._evicted[name]
            if node.capacity - node.used >= size:  # the view may be stale: never evict for this
                self._load(node, name, size, t, deliberate=True).last_use = used
                node.lru.move_to_end(name, last=False)  # speculative: the first to go


def compare(trace: Trace, config: SimConfig, progress: Callable[[int], None] | None = None) -> dict[str, Result]:
    """The mesh and every baseline on one trace, at the mesh's total capacity."""
    total = config.nodes * config.capacity_bytes
    return {
        "mesh": MeshSim(trace, config).run(progress),
        "global_lru": run_lru(trace, total, config.latency),
        "random": run_random(trace, config.nodes, config.capacity_bytes, config.latency, config.seed),
        "belady": run_belady(trace, total, config.latency),
    }
