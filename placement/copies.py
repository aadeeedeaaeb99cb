"""How many copies of each model the mesh keeps, and what to load into free space: pure decisions.

A node applies `plan_copy_changes` periodically to the models it holds and `plan_proactive_loads` to
models without a copy. Every input is a snapshot and the clock and randomness are parameters, so two
nodes deciding from the same view decide the same thing.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from placement.policy import PlacementConfig, choose_load_target, load_exclusions
from placement.types import ModelView, NodeView


@dataclass(frozen=True, slots=True)
class CopyConfig:
    # A copy serving more than this many requests per second is overloaded: the mesh wants
    # ceil(rate / this) copies of the model (ModelMesh: 2000 req/min).
    hot_rate_per_copy: float = 2000 / 60
    # The same on requests in flight, for slow models whose request rate alone looks modest.
    hot_inflight_per_copy: int = 16
    # Copies for load are bounded by this many ...
    max_copies: int = 8
    # ... and by this share of the live nodes (ModelMesh: a third), but 2 are always allowed, so a
    # small mesh still gets a second copy. An extra copy evicts other models: in an overcommitted
    # mesh a hot model must not take over every node.
    max_copies_fraction: float = 1 / 3
    # Scale-down keeps ceil(rate / this) copies. Below the hot threshold, so a rate between the two
    # neither adds nor removes copies (hysteresis: no load/unload flapping around one threshold).
    cool_rate_per_copy: float = 500 / 60
    # Only a copy that served nothing for this long goes: routing prefers the oldest copy when copies
    # are idle, so a surplus copy stops receiving requests. Under memory pressure its node's LRU evicts
    # it sooner anyway; this returns the memory of a mesh with room, for second copies and proactive loads.
    cool_after_s: float = 20 * 60
    # A single-copy model gets a second copy (availability: a node loss then costs no reload) when its
    # uses span at least repeat_min_span_s and the last one is at most repeat_max_idle_s old; it keeps
    # it while that holds. ModelMesh asks for a use 7-40 min after the previous one, which a model used
    # continuously never has; a span counts both a model used twice 10 min apart and one used every
    # second for 10 min.
    repeat_min_span_s: float = 7 * 60
    repeat_max_idle_s: float = 40 * 60
    # Second copies only while this share of the mesh's capacity is free: they are a luxury, and in a
    # full mesh each one would evict a model someone uses.
    availability_min_free_fraction: float = 0.1
    # Adds (counted in copies) plus removals per call: a burst of changes would compete with the loads
    # that requests wait on.
    max_changes_per_call: int = 8
    # Proactive loads: models without a copy used within this window, or never used (newly registered).
    proactive_recent_s: float = 30 * 60
    # Proactive loads leave this share of each node free, so the next miss there evicts nothing.
    proactive_reserve_fraction: float = 0.1
    max_proactive_per_call: int = 16

    def __post_init__(self) -> None:
        if not 0 < self.cool_rate_per_copy < self.hot_rate_per_copy:
            raise ValueError("cool_rate_per_copy must be in (0, hot_rate_per_copy)")
        if self.hot_inflight_per_copy < 1 or self.max_copies < 1:
            raise ValueError("hot_inflight_per_copy and max_copies must be >= 1")
        for name in ("max_copies_fraction", "availability_min_free_fraction", "proactive_reserve_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if not 0 <= self.repeat_min_span_s < self.repeat_max_idle_s:
            raise ValueError("repeat_min_span_s must be in [0, repeat_max_idle_s)")
        if min(self.cool_after_s, self.proactive_recent_s, self.max_changes_per_call, self.max_proactive_per_call) < 0:
            raise ValueError("cool_after_s, proactive_recent_s and the per-call bounds must be >= 0")


@dataclass(frozen=True, slots=True)
class CopyLoad:
    """One model held by the deciding node. Rates and uses are the model's, over all its copies."""

    name: str
    rate_per_s: float  # requests per second, smoothed over minutes
    inflight: int
    copies: int  # copies in the mesh, loaded or loading, this node's included
    last_used: float
    first_used: float  # first use since the model last had no copy
    min_copies: int = 1  # set at registration
    pinned: bool = False  # set at registration: never unloaded
    here_last_used: float | None = None  # last use of this node's copy; None: last_used


@dataclass(frozen=True, slots=True)
class CopyPlan:
    # (model, n): the mesh should hold n more copies than the `copies` the decision saw. Apply it as
    # "ensure copies + n" against the model record (compare-and-set), so that holders deciding at
    # once converge on one target instead of adding up.
    add: tuple[tuple[str, int], ...]
    remove_here: tuple[str, ...]  # models whose copy on this node may go


_DEFAULT = CopyConfig()
_DEFAULT_PLACEMENT = PlacementConfig()


def copy_limit(live_nodes: int, min_copies: int, config: CopyConfig = _DEFAULT) -> int:
    """The most copies one model may have in a mesh of `live_nodes` nodes."""
    for_load = min(config.max_copies, max(2, int(config.max_copies_fraction * live_nodes)))
    return min(live_nodes, max(min_copies, for_load))


def plan_copy_changes(
    loads: Iterable[CopyLoad],
    *,
    nodes: Mapping[str, NodeView],
    me: str,
    now: float,
    config: CopyConfig = _DEFAULT,
) -> CopyPlan:
    """Copies to add (loaded on other nodes) and this node's copies to remove.

    Adds, most urgent first: copies below min_copies, copies for load (rate or in-flight over the hot
    thresholds, bounded by copy_limit), a second copy for a model used repeatedly when the mesh has
    room. A copy here is removed when it served nothing for cool_after_s and the mesh keeps enough
    without it: never the last copy, never below min_copies, the copies its rate still needs or a
    second copy the model still earns, never pinned.

    The caller must confirm that another copy is loaded on a reachable node before unloading, and
    remove this node from the model record with a compare-and-set conditioned on that copy, so that
    two holders removing at once cannot both go. A draining node (shutting down or not in
    `nodes`) decides nothing: the drain moves its models.
    """
    mine = nodes.get(me)
    if mine is None or mine.shutting_down:
        return CopyPlan((), ())
    live = [n for n in nodes.values() if not n.shutting_down]
    capacity = sum(n.capacity_bytes for n in live)
    roomy = capacity > 0 and sum(max(0, n.free_bytes) for n in live) >= capacity * config.availability_min_free_fraction
    adds: list[tuple[int, str, int]] = []  # (urgency, model, n): 0 min_copies, 1 load, 2 availability
    removals: list[tuple[float, str]] = []  # (-idle, model): the longest idle first
    for load in loads:
        limit = copy_limit(len(live), load.min_copies, config)
        urgency, wanted = _wanted(load, now, roomy, config)
        if load.copies < min(wanted, limit):
            adds.append((urgency, load.name, min(wanted, limit) - load.copies))
        elif _removable(load, now, config):
            removals.append((_here_last_used(load) - now, load.name))
    budget = config.max_changes_per_call
    add: list[tuple[str, int]] = []
    for _, name, n in sorted(adds):
        if budget <= 0:
            break
        add.append((name, min(n, budget)))
        budget -= add[-1][1]
    return CopyPlan(tuple(add), tuple(name for _, name in sorted(removals)[:budget]))


def _wanted(load: CopyLoad, now: float, roomy: bool, config: CopyConfig) -> tuple[int, int]:
    """How many copies the model should grow to, and the urgency of the strongest reason."""
    if load.copies < load.min_copies:
        return 0, load.min_copies
    for_load = max(
        math.ceil(load.rate_per_s / config.hot_rate_per_copy),
        math.ceil(load.inflight / config.hot_inflight_per_copy),
    )
    if for_load > load.copies:
        return 1, for_load
    return 2, 2 if roomy and load.copies == 1 and _repeated(load, now, config) else 1


def _repeated(load: CopyLoad, now: float, config: CopyConfig) -> bool:
    return (
        load.last_used - load.first_used >= config.repeat_min_span_s
        and now - load.last_used <= config.repeat_max_idle_s
    )


def _removable(load: CopyLoad, now: float, config: CopyConfig) -> bool:
    if load.pinned or now - _here_last_used(load) < config.cool_after_s:
        return False
    # The adding rules with the cool threshold and without the room condition, so that no copy is
    # removed only to be added again by the next decision.
    keep = max(
        load.min_copies, math.ceil(load.rate_per_s / config.cool_rate_per_copy),
        math.ceil(load.inflight / config.hot_inflight_per_copy), 2 if _repeated(load, now, config) else 1,
    )
    return load.copies > keep


def _here_last_used(load: CopyLoad) -> float:
    return load.last_used if load.here_last_used is None else load.here_last_used


def plan_proactive_loads(
    candidates: Iterable[ModelView],
    *,
    nodes: Mapping[str, NodeView],
    now: float,
    rng: random.Random,
    config: CopyConfig = _DEFAULT,
    placement: PlacementConfig = _DEFAULT_PLACEMENT,
) -> tuple[tuple[str, str], ...]:
    """(model, node) loads of models without a copy into free space, never evicting anything.

    Recently used models first (the most recent first), then never used ones (newly registered), by
    name; at most max_proactive_per_call. Each node keeps proactive_reserve_fraction of its capacity
    free, and a node where the model failed recently is not chosen. Placement is the request path's
    own (choose_load_target), over the nodes with room, with each pick's bytes and load counted
    before the next one.
    """
    views = {iid: n for iid, n in nodes.items() if not n.shutting_down}
    picks: list[tuple[str, str]] = []
    if not _room(views, config):
        return ()  # the usual case in an overcommitted mesh: the candidates are not even read
    wanted = [
        m for m in candidates
        if not m.copies and (m.last_used is None or now - m.last_used <= config.proactive_recent_s)
    ]
    wanted.sort(key=lambda m: (m.last_used is None, -(m.last_used or 0.0), m.name))
    for model in wanted:
        room = _room(views, config)
        if len(picks) >= config.max_proactive_per_call or not room:
            break
        target = choose_load_target(
            [views[iid] for iid, r in room.items() if r >= model.size_bytes], size_bytes=model.size_bytes,
            now=now, rng=rng, exclude=load_exclusions(model, now, placement), config=placement, runtime=model.runtime,
        )
        if target is None:
            continue
        node = views[target]
        views[target] = dataclasses.replace(
            node, used_bytes=node.used_bytes + model.size_bytes, loads_in_progress=node.loads_in_progress + 1
        )
        picks.append((model.name, target))
    return tuple(picks)


def _room(views: Mapping[str, NodeView], config: CopyConfig) -> dict[str, float]:
    """Bytes each node can take above its reserve, for nodes with any."""
    room = {iid: n.free_bytes - n.capacity_bytes * config.proactive_reserve_fraction for iid, n in views.items()}
    return {iid: r for iid, r in room.items() if r > 0}
