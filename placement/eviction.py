"""Which loaded models to evict to make room for a load: a pure decision.

The caller passes its models in least-recently-used order, so a decision reads only as many
entries as it needs (the victims plus the ones it skips), never more.

The churn guard: a resident whose `last_used` is younger than `min_victim_idle_s` is never a victim,
so a burst of cold models cannot flush the hot set; a node that cannot make room without such a
victim refuses the load (None) and placement picks another node. Which use counts is the caller's
choice. Passing the last use *after* the one that loaded the model (None until then) turns the guard
into an admission filter: models loaded by a cold burst and not used again stay evictable, so the
burst recycles its own space instead of the hot set's, and the node refuses only when everything it
holds was reused within the window.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Resident:
    """A model occupying capacity, as eviction sees it."""

    key: str
    size_bytes: int
    in_use: bool  # a request in flight or a load in progress: never a victim
    last_used: float | None = None  # the use the churn guard counts; None: never protected by it
    pinned: bool = False  # registered as pinned: never a victim


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    victims: tuple[str, ...]
    freed_bytes: int


def plan_eviction(
    lru_first: Iterable[Resident],
    *,
    needed_bytes: int,
    free_bytes: int,
    now: float | None = None,
    min_victim_idle_s: float = 0.0,
) -> EvictionPlan | None:
    """Victims, oldest first, whose removal frees `needed_bytes`; None if it cannot be done.

    With `min_victim_idle_s` > 0 (which needs `now`), residents used within that many seconds are skipped.
    """
    if min_victim_idle_s > 0 and now is None:
        raise ValueError("the churn guard (min_victim_idle_s > 0) needs now")
    if needed_bytes <= free_bytes:
        return EvictionPlan((), 0)
    # Everything used after this instant is protected; +inf (nothing is) when the guard is off.
    guarded_after = float("inf") if now is None or min_victim_idle_s <= 0 else now - min_victim_idle_s
    victims: list[str] = []
    freed = 0
    for resident in lru_first:
        if resident.in_use or resident.pinned:
            continue
        if resident.last_used is not None and resident.last_used > guarded_after:
            continue
        victims.append(resident.key)
        freed += resident.size_bytes
        if free_bytes + freed >= needed_bytes:
            return EvictionPlan(tuple(victims), freed)
    return None
