"""Where to load a model after a mesh-wide cache miss, which copy to route to, and when to give up.

Pure decisions over snapshots: the clock and the randomness are parameters, so every rule is testable
and two nodes deciding from the same snapshot with the same seed decide the same thing.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from placement.types import LOADED, CopyView, FailureView, ModelView, NodeView


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    # A node with at least this share of the best candidate's free space is as good a target: a wider
    # shortlist spreads concurrent misses, decided by many nodes from the same stale snapshot, over
    # several nodes instead of herding them all onto the emptiest one.
    near_equal_free_ratio: float = 0.8
    # The same for full nodes, on cache age (how long their least valuable model has been idle).
    near_equal_cache_age_ratio: float = 0.8
    # Published LRU times lag by tens of seconds (records are re-published only on significant change),
    # so cache ages this close to the best are indistinguishable whatever their ratio.
    near_equal_cache_age_slack_s: float = 30.0
    # Drop a shortlisted node whose request rate or in-flight count exceeds busy_factor times the least
    # busy shortlisted node's, plus the slack below: a load there would compete with its live traffic.
    busy_factor: float = 2.0
    # Below these absolute differences nodes are equally idle; without them 1 req/s against 0 would
    # count as "much busier" and needlessly narrow the spread.
    busy_rate_slack_rps: float = 2.0
    busy_inflight_slack: int = 2
    # A failed load stops counting after this long (ModelMesh: 15 min), so a model whose storage or
    # runtime was fixed becomes loadable again without an operator.
    failure_expiry_s: float = 15 * 60.0
    # Give up after this many distinct nodes with an unexpired load failure ...
    max_failures: int = 3
    # ... or this many distinct nodes tried for one request, so a broken model fails fast and clearly
    # instead of walking the whole mesh.
    max_tried: int = 5

    def __post_init__(self) -> None:
        for name in ("near_equal_free_ratio", "near_equal_cache_age_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1]")
        if self.busy_factor < 1.0:
            raise ValueError("busy_factor must be >= 1")
        if min(self.near_equal_cache_age_slack_s, self.busy_rate_slack_rps, self.busy_inflight_slack) < 0:
            raise ValueError("slacks must be >= 0")
        if self.failure_expiry_s <= 0 or self.max_failures < 1 or self.max_tried < 1:
            raise ValueError("failure_expiry_s, max_failures and max_tried must be positive")


_DEFAULT = PlacementConfig()


# -- load placement -------------------------------------------------------------------------------


def choose_load_target(
    nodes: Iterable[NodeView],
    *,
    size_bytes: int,
    now: float,
    rng: random.Random,
    exclude: Collection[str] = (),
    config: PlacementConfig = _DEFAULT,
    runtime: str = "",
) -> str | None:
    """The node to load a `size_bytes` model on; None when every node is shutting down, excluded, too small,
    or runs another runtime than `runtime` ("" for any).

    Callers pass `exclude` = tried nodes | load_exclusions(model, ...): a failed node is not retried.
    """
    fits: list[NodeView] = []
    full: list[NodeView] = []
    for node in nodes:
        if (node.shutting_down or node.runtime_down or node.instance_id in exclude or node.capacity_bytes < size_bytes
                or (runtime and node.runtime != runtime)):
            continue
        (fits if node.free_bytes >= size_bytes else full).append(node)
    if fits:
        # Free space first: loading there evicts nothing, and the most free space absorbs the most
        # future misses without eviction.
        shortlist = _near_best(fits, lambda n: float(n.free_bytes), config.near_equal_free_ratio, 0.0)
    elif full:
        # All full: evict where the victim (the node's least recently used model) is the least
        # valuable in the mesh, i.e. has been idle longest.
        shortlist = _near_best(
            full,
            lambda n: _eviction_age(n, now),
            config.near_equal_cache_age_ratio,
            config.near_equal_cache_age_slack_s,
        )
    else:
        return None
    # A request usually waits on this load, and a node's loads share its loading slots and disk.
    fewest_loads = min(n.loads_in_progress for n in shortlist)
    shortlist = [n for n in shortlist if n.loads_in_progress == fewest_loads]
    shortlist = _drop_much_busier(shortlist, config)
    if len(shortlist) == 1:
        return shortlist[0].instance_id
    # Sorted so the pick depends on the seed only, not on the order the snapshot was iterated in.
    return rng.choice(sorted(n.instance_id for n in shortlist))


def _eviction_age(node: NodeView, now: float) -> float:
    # A full node with no loaded model is full of loads in progress: it has nothing to evict, so it
    # ranks last rather than "infinitely old" as an empty node would.
    return 0.0 if node.lru_time_s is None else node.cache_age_s(now)


def _near_best(
    candidates: list[NodeView], score: Callable[[NodeView], float], ratio: float, slack: float
) -> list[NodeView]:
    scores = [score(n) for n in candidates]
    best = max(scores)
    return [n for n, s in zip(candidates, scores, strict=True) if s >= best * ratio or best - s <= slack]


def _drop_much_busier(shortlist: list[NodeView], config: PlacementConfig) -> list[NodeView]:
    # Compared against one reference node (least request rate, then fewest in flight) rather than the
    # minimum of each metric separately, so the reference itself always survives.
    ref = min(shortlist, key=lambda n: (n.request_rate, n.inflight))
    max_rate = ref.request_rate * config.busy_factor + config.busy_rate_slack_rps
    max_inflight = ref.inflight * config.busy_factor + config.busy_inflight_slack
    return [n for n in shortlist if n.request_rate <= max_rate and n.inflight <= max_inflight]


# -- failures -------------------------------------------------------------------------------------


def active_failures(model: ModelView, now: float, config: PlacementConfig = _DEFAULT) -> tuple[FailureView, ...]:
    """The model's load failures that have not expired yet."""
    return tuple(f for f in model.failures if now - f.at < config.failure_expiry_s)


def load_exclusions(model: ModelView, now: float, config: PlacementConfig = _DEFAULT) -> frozenset[str]:
    """Nodes the model must not be loaded on again until their failure expires."""
    return frozenset(f.instance_id for f in active_failures(model, now, config))


def should_give_up(
    model: ModelView, tried: Collection[str], now: float, config: PlacementConfig = _DEFAULT
) -> str | None:
    """Why a request for `model` must fail now, naming the model and the last cause; None to keep going."""
    failures = sorted(active_failures(model, now, config), key=lambda f: f.at)
    failed = list(dict.fromkeys(f.instance_id for f in failures))  # distinct, oldest failure first
    last = failures[-1] if failures else None
    cause = f"; last error on {last.instance_id}: {last.message}" if last is not None else ""
    if len(failed) >= config.max_failures:
        # Lifts when the oldest failure expires: say when, so the caller can report a retryable status.
        retry_in = max(0.0, failures[0].at + config.failure_expiry_s - now)
        return (
            f"model {model.name!r} failed to load on {len(failed)} nodes ({_names(failed)}){cause}; "
            f"loads are retried in {retry_in:.0f}s, when the oldest failure expires"
        )
    visited = list(dict.fromkeys([*tried, *failed]))
    if len(visited) >= config.max_tried:
        return (
            f"model {model.name!r} could not be served by any of the {len(visited)} nodes tried "
            f"({_names(visited)}){cause}"
        )
    return None


def _names(ids: list[str], shown: int = 8) -> str:
    more = f", +{len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


# -- request routing ------------------------------------------------------------------------------


def choose_copy(
    copies: Sequence[CopyView],
    *,
    nodes: Mapping[str, NodeView],
    local_outstanding: Mapping[str, int],
    exclude: Collection[str],
    rng: random.Random,
    version: str = "",
) -> str | None:
    """The copy to forward a request to: one holding `version` first (a copy of another version would have to
    load it), then LOADED, then fewest in flight, then the oldest copy. With `version` "" any copy will do.

    Oldest (smallest `since`) rather than ModelMesh's least recently used: every router sees the same
    `since` in etcd, so light traffic (all in-flight counts equal) converges on one warm copy mesh-wide,
    and extra copies serve only overflow. In an overcommitted mesh an extra copy nobody needs should
    idle and age out of its node's LRU, returning memory; spraying traffic keeps every copy warm and
    pinned. Among LOADING copies the oldest load is the one likely to finish first.

    One pass over `copies`, lookups in `nodes` only for them: the cost is O(copies), never O(models).
    Pass `exclude` as a set; `nodes` must hold only live nodes (a copy on a missing node is never chosen).
    """
    best: tuple[bool, bool, int, float] | None = None
    best_id = ""
    ties: list[str] | None = None  # allocated only on an exact tie, which is rare with float `since`
    for copy in copies:
        iid = copy.instance_id
        node = nodes.get(iid)
        if node is None or node.shutting_down or node.runtime_down or iid in exclude:
            continue
        key = (bool(version) and version not in copy.versions, copy.state != LOADED,
               local_outstanding.get(iid, 0) + node.inflight, copy.since)
        if best is None or key < best:
            best, best_id, ties = key, iid, None
        elif key == best:
            if ties is None:
                ties = [best_id]
            ties.append(iid)
    if best is None:
        return None
    return best_id if ties is None else rng.choice(ties)
