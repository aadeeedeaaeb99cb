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
