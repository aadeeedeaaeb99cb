"""Which loaded models to evict to make room for a load: a pure decision.

The caller passes its models in least-recently-used order, so a decision reads only as many
entries as it needs (the victims plus the in-use ones it skips), never the whole cache.
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


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    victims: tuple[str, ...]
    freed_bytes: int


def plan_eviction(
    lru_first: Iterable[Resident], *, needed_bytes: int, free_bytes: int
) -> EvictionPlan | None:
    """Victims, oldest first, whose removal frees `needed_bytes`; None if it cannot be done."""
    if needed_bytes <= free_bytes:
        return EvictionPlan((), 0)
    victims: list[str] = []
    freed = 0
    for resident in lru_first:
        if resident.in_use:
            continue
        victims.append(resident.key)
        freed += resident.size_bytes
        if free_bytes + freed >= needed_bytes:
            return EvictionPlan(tuple(victims), freed)
    return None
