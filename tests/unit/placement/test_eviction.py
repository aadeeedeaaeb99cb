import pytest

from placement.eviction import Resident, plan_eviction


def residents(*spec: tuple[str, int, bool]) -> list[Resident]:
    return [Resident(key, size, in_use) for key, size, in_use in spec]


def test_no_eviction_when_room_is_free() -> None:
    plan = plan_eviction(residents(("a", 10, False)), needed_bytes=5, free_bytes=5)
    assert plan is not None and plan.victims == ()


def test_evicts_oldest_first_and_stops_when_enough() -> None:
    lru = residents(("old", 10, False), ("mid", 10, False), ("new", 10, False))
    plan = plan_eviction(lru, needed_bytes=15, free_bytes=0)
    assert plan is not None
    assert plan.victims == ("old", "mid")
    assert plan.freed_bytes == 20


def test_skips_models_in_use() -> None:
    lru = residents(("busy", 100, True), ("idle", 10, False))
    plan = plan_eviction(lru, needed_bytes=10, free_bytes=0)
    assert plan is not None and plan.victims == ("idle",)


def test_none_when_only_busy_models_would_free_enough() -> None:
    lru = residents(("busy", 100, True), ("idle", 10, False))
    assert plan_eviction(lru, needed_bytes=50, free_bytes=5) is None


def test_reads_only_what_it_needs() -> None:
    consumed: list[str] = []

    def lazy() -> object:
        for i in range(1_000_000):
            consumed.append(str(i))
            yield Resident(str(i), 10, False)

    plan = plan_eviction(lazy(), needed_bytes=30, free_bytes=0)  # type: ignore[arg-type]
    assert plan is not None and len(plan.victims) == 3
    assert len(consumed) == 3


def test_churn_guard_spares_recently_used_models() -> None:
    lru = [Resident("old", 10, False, last_used=100.0), Resident("recent", 10, False, last_used=195.0)]
    plan = plan_eviction(lru, needed_bytes=10, free_bytes=0, now=200.0, min_victim_idle_s=30.0)
    assert plan is not None and plan.victims == ("old",)
    assert plan_eviction(lru, needed_bytes=20, free_bytes=0, now=200.0, min_victim_idle_s=30.0) is None
    unguarded = plan_eviction(lru, needed_bytes=20, free_bytes=0, now=200.0)
    assert unguarded is not None and unguarded.victims == ("old", "recent")


def test_pinned_models_are_never_victims() -> None:
    lru = [Resident("pinned", 100, False, pinned=True), Resident("free", 10, False)]
    plan = plan_eviction(lru, needed_bytes=10, free_bytes=0)
    assert plan is not None and plan.victims == ("free",)
    assert plan_eviction(lru, needed_bytes=50, free_bytes=0) is None


# -- churn guard, pinning, reuse protection ------------------------------------------------------

NOW = 1000.0
Victims = tuple[str, ...] | None


def plan(lru: list[Resident], needed: int = 10, **kw: object) -> Victims:
    result = plan_eviction(lru, needed_bytes=needed, free_bytes=0, **kw)  # type: ignore[arg-type]
    return None if result is None else result.victims


def r(key: str, *, idle: float | None = None, reused: bool = False, pinned: bool = False, size: int = 10) -> Resident:
    return Resident(key, size, False, None if idle is None else NOW - idle, pinned=pinned, reused=reused)


GUARD_CASES: list[tuple[str, list[Resident], dict[str, object], Victims]] = [
    ("recent victim skipped", [r("hot", idle=5), r("cold", idle=100)], {"min_victim_idle_s": 60}, ("cold",)),
    ("idle exactly the guard is a victim", [r("a", idle=60)], {"min_victim_idle_s": 60}, ("a",)),
    ("guard refuses when all are recent", [r("a", idle=1), r("b", idle=2)], {"min_victim_idle_s": 60}, None),
    ("guard off: plain LRU", [r("a", idle=1), r("b", idle=2)], {"min_victim_idle_s": 0}, ("a",)),
    ("unknown last use is not guarded", [r("a"), r("b", idle=1)], {"min_victim_idle_s": 60}, ("a",)),
    ("pinned never a victim", [r("pin", idle=1e6, pinned=True), r("b", idle=100)], {}, ("b",)),
    ("only pinned: refuse", [r("pin", idle=1e6, pinned=True)], {}, None),
    # Reuse protection: a 20-byte budget keeps the two most recent reused residents.
    ("once-used goes before reused", [r("reused", reused=True), r("once")],
     {"reused_bytes": 10, "protect_reused_bytes": 20}, ("once",)),
    ("reused beyond the budget are not protected", [r("r1", reused=True), r("r2", reused=True), r("r3", reused=True)],
     {"reused_bytes": 30, "protect_reused_bytes": 20}, ("r1",)),
    ("protected and nothing else: refuse", [r("r1", reused=True), r("r2", reused=True)],
     {"reused_bytes": 20, "protect_reused_bytes": 20}, None),
    ("no budget: plain LRU", [r("r1", reused=True), r("once")], {"reused_bytes": 10}, ("r1",)),
]


@pytest.mark.parametrize(("lru", "kw", "victims"), [c[1:] for c in GUARD_CASES], ids=[c[0] for c in GUARD_CASES])
def test_guard_and_protection_rules(lru: list[Resident], kw: dict[str, object], victims: Victims) -> None:
    assert plan(lru, now=NOW, **kw) == victims


def test_guard_needs_the_clock() -> None:
    with pytest.raises(ValueError):
        plan_eviction([r("a", idle=1)], needed_bytes=10, free_bytes=0, min_victim_idle_s=5)


def test_guard_and_protection_together_pick_the_oldest_unprotected() -> None:
    lru = [r("r-old", idle=500, reused=True), r("new", idle=1), r("once", idle=30), r("r-new", idle=2, reused=True)]
    kw = {"now": NOW, "min_victim_idle_s": 10, "reused_bytes": 20, "protect_reused_bytes": 20}
    assert plan(lru, **kw) == ("once",)
    assert plan(lru, needed=20, **kw) is None  # only the guarded and the protected remain


def test_existing_callers_are_unaffected() -> None:
    # meshnode/cache.py builds Resident(key, size, in_use) and passes no clock.
    assert plan([Resident("a", 10, False), Resident("b", 10, False)]) == ("a",)
