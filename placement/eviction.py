"""Which loaded models to evict to make room for a load: a pure decision.

The caller passes its models in least-recently-used order, so a decision reads only as many
entries as it needs (the victims plus the ones it skips), never more.

Two protections decide what a full node may evict besides its least recently used model:
- The churn guard: a resident used within `min_victim_idle_s` is never a victim. A node that cannot
  make room without one refuses the load (None) and placement picks another node; when every node
  refuses, the mesh is thrashing and the request is better refused than served by evicting what the
  next request needs.
- Reuse protection (segmented LRU): the most recently used `protect_reused_bytes` of the models used
  again since their load are skipped, so a model loaded for one request goes before a model in steady
  use, even a more recent one. A burst of cold models, or the long tail of a Zipf workload, then
  recycles its own space instead of flushing the hot set; the protected share is bounded, so models
  that stop being used lose protection as others are reused, and a shifting workload still turns over.
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
    last_used: float | None = None  # for the churn guard; None: not protected by it
    pinned: bool = False  # registered as pinned: never a victim
    reused: bool = False  # used again since it was loaded


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
    reused_bytes: int = 0,
    protect_reused_bytes: int = 0,
) -> EvictionPlan | None:
    """Victims, oldest first, whose removal frees `needed_bytes`; None if it cannot be done.

    Never in use or pinned residents; with `min_victim_idle_s` > 0 (which needs `now`), none used within
    that many seconds; with `protect_reused_bytes` > 0, none of the reused residents among the most
    recent `protect_reused_bytes` of them (`reused_bytes`: the size of every reused resident).
    """
    if min_victim_idle_s > 0 and now is None:
        raise ValueError("the churn guard (min_victim_idle_s > 0) needs now")
    if needed_bytes <= free_bytes:
        return EvictionPlan((), 0)
    # Residents used after this instant are protected: none when the guard is off.
    guarded_after = float("inf") if now is None or min_victim_idle_s <= 0 else now - min_victim_idle_s
    # Reused bytes older than the protected segment: a reused resident past them is protected.
    unprotected_reused = reused_bytes - protect_reused_bytes if protect_reused_bytes > 0 else float("inf")
    victims: list[str] = []
    freed = 0
    reused_before = 0
    for resident in lru_first:
        if resident.reused:
            protected = reused_before >= unprotected_reused
            reused_before += resident.size_bytes
            if protected:
                continue
        if resident.in_use or resident.pinned:
            continue
        if resident.last_used is not None and resident.last_used > guarded_after:
            continue
        victims.append(resident.key)
        freed += resident.size_bytes
        if free_bytes + freed >= needed_bytes:
            return EvictionPlan(tuple(victims), freed)
    return None
