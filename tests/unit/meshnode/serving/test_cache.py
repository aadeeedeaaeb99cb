"""ModelCache over a fake runtime and a manual clock: single-flight loads, eviction, protections, failures."""

from __future__ import annotations

import asyncio

import pytest

from meshnode.errors import LoadFailed, ModelNotFound, ModelUnavailable, ResourceExhausted
from meshnode.observability.metrics import NodeMetrics
from meshnode.serving.cache import ModelCache
from meshnode.serving.entries import CachedModel, CacheStats, LoadOptions
from tests.unit.meshnode.fakes import NOW, SIZE, FakeRuntime, LoadPlan, Log, ManualClock, source

pytestmark = pytest.mark.timeout(10)


class Kit:
    """A cache over a fake runtime, its clock, metrics, and every change it told its listeners of."""

    def __init__(self, capacity: int = 1_000, *, churn_guard_s: float = 0.0, backoff_s: float = 30.0,
                 load_timeout_s: float = 5.0) -> None:
        self.clock = ManualClock()
        self.runtime = FakeRuntime()
        self.metrics = NodeMetrics()
        self.cache = ModelCache(self.runtime, capacity_bytes=capacity, metrics=self.metrics,
                                load_timeout_s=load_timeout_s, failure_backoff_s=backoff_s,
                                churn_guard_s=churn_guard_s, wall_clock=self.clock)
        self.changes: Log[str] = Log()
        self.cache.add_listener(self.changes.append)

    async def acquire(self, name: str, *, predicted: int = SIZE, timeout_s: float | None = None, pinned: bool = False,
                      churn_guard: bool = False) -> CachedModel:
        options = LoadOptions(predicted, timeout_s=timeout_s, pinned=pinned, churn_guard=churn_guard)
        return await self.cache.acquire(source(name), "", options)

    async def use(self, name: str, times: int = 1, *, pinned: bool = False, churn_guard: bool = False) -> None:
        for _ in range(times):
            self.cache.release(await self.acquire(name, pinned=pinned, churn_guard=churn_guard))

    def held(self) -> list[str]:
        """Keys of the copies here, loaded or loading, least recently used first."""
        return [e.key for e in self.cache.loaded_entries()]


# -- single-flight loads ----------------------------------------------------------------------------


async def test_concurrent_misses_share_one_load_and_each_gets_the_entry() -> None:
    kit = Kit()
    gate = asyncio.Event()
    kit.runtime.plan("a", LoadPlan(size_bytes=120, gate=gate))
    waiters = [asyncio.create_task(kit.acquire("a")) for _ in range(5)]
    await kit.runtime.loads.wait_len(1)
    assert kit.cache.stats() == CacheStats(capacity_bytes=1_000, used_bytes=SIZE, models_loaded=0,
                                           loads_in_progress=1, lru_time_s=None)
    gate.set()
    entries = await asyncio.gather(*waiters)
    assert all(e is entries[0] for e in entries)
    assert kit.runtime.loads == ["a@1"]
    assert entries[0].inflight == 5 and entries[0].size_bytes == 120  # measured replaces predicted
    assert kit.cache.stats() == CacheStats(capacity_bytes=1_000, used_bytes=120, models_loaded=1,
                                           loads_in_progress=0, lru_time_s=NOW)
    assert (kit.metrics.loads, kit.metrics.cache_misses, kit.metrics.cache_hits) == (1, 5, 0)


async def test_a_loaded_model_is_a_hit_found_by_name_and_requested_version() -> None:
    kit = Kit()
    await kit.use("a")
    entry = await kit.acquire("a")
    assert kit.cache.ready == {("a", ""): entry}
    kit.cache.release(entry)
    kit.clock.advance(5)
    versioned = await kit.cache.acquire(source("a"), "1", LoadOptions(SIZE))
    assert versioned is entry and set(kit.cache.ready) == {("a", ""), ("a", "1")}
    kit.cache.release(versioned)
    assert kit.runtime.loads == ["a@1"]
    assert (kit.metrics.cache_misses, kit.metrics.cache_hits) == (1, 2)
    assert (entry.inflight, entry.requests, entry.last_used) == (0, 3, NOW + 5)


# -- eviction ----------------------------------------------------------------------------------------


async def test_a_full_cache_evicts_its_least_recently_used_model() -> None:
    kit = Kit(capacity=3 * SIZE)
    for name in ("a", "b", "c"):
        await kit.use(name, times=2)  # all reused: reuse protection covers only the newest half of them
    await kit.use("a")  # b is now the least recently used, though a was loaded first
    await kit.use("d")
    assert kit.held() == ["c@1", "a@1", "d@1"]
    await kit.runtime.unloads.wait_len(1)
    assert kit.runtime.unloads == ["b@1"]
    assert (kit.metrics.evictions, kit.cache.used_bytes) == (1, 3 * SIZE)


@pytest.mark.parametrize(("uses_of_a", "evicted"), [(1, "a@1"), (3, "b@1")])
async def test_a_model_used_again_since_its_load_outlives_newer_one_off_models(uses_of_a: int, evicted: str) -> None:
    kit = Kit(capacity=4 * SIZE)
    await kit.use("a", times=uses_of_a)
    for name in ("b", "c", "d"):
        await kit.use(name)
    await kit.use("e")  # a is the least recently used: plain LRU takes it, unless it is reuse-protected
    assert evicted not in kit.held() and len(kit.held()) == 4
    await kit.runtime.unloads.wait_len(1)
    assert kit.runtime.unloads == [evicted]


async def test_a_measured_size_above_the_prediction_evicts_others_to_get_back_within_capacity() -> None:
    kit = Kit(capacity=3 * SIZE)
    await kit.use("a")
    await kit.use("b")
    kit.runtime.sizes["c"] = 2 * SIZE
    await kit.use("c")  # predicted SIZE: it fit without eviction until it measured 2 * SIZE
    assert kit.held() == ["b@1", "c@1"]
    assert kit.cache.used_bytes == 3 * SIZE
    await kit.runtime.unloads.wait_len(1)
    assert kit.runtime.unloads == ["a@1"]


async def test_a_model_predicted_larger_than_the_capacity_is_refused_without_evicting() -> None:
    kit = Kit(capacity=3 * SIZE)
    await kit.use("a")
    with pytest.raises(ResourceExhausted) as raised:
        await kit.acquire("huge", predicted=5 * SIZE)
    assert str(raised.value) == ("model 'huge' version 1 needs about 500 bytes, more than this node's whole "
                                 "capacity of 300 bytes")
    assert kit.held() == ["a@1"] and kit.runtime.loads == ["a@1"] and kit.metrics.evictions == 0


async def test_a_model_measured_larger_than_the_capacity_fails_is_unloaded_and_backs_off() -> None:
    kit = Kit(capacity=3 * SIZE)
    kit.runtime.sizes["huge"] = 5 * SIZE
    with pytest.raises(ResourceExhausted) as raised:
        await kit.acquire("huge")
    assert str(raised.value) == ("model 'huge' version 1 measured 500 bytes once loaded, more than this "
                                 "node's whole capacity of 300 bytes")
    await kit.runtime.unloads.wait_len(1)
    assert kit.runtime.unloads == ["huge@1"]
    assert kit.cache.stats() == CacheStats(capacity_bytes=300, used_bytes=0, models_loaded=0, loads_in_progress=0,
                                           lru_time_s=None)
    assert kit.cache.failures.active("huge", "1")


async def test_a_pinned_model_is_never_evicted() -> None:
    kit = Kit(capacity=2 * SIZE)
    await kit.use("pinned", pinned=True)
    await kit.use("b")
    await kit.use("c")  # pinned is the least recently used: b goes instead
    await kit.use("d")
    assert kit.held() == ["pinned@1", "d@1"]
    await kit.use("e", pinned=True)
    assert kit.held() == ["pinned@1", "e@1"]
    with pytest.raises(ResourceExhausted) as raised:
        await kit.use("f")
    assert str(raised.value) == ("no room for model 'f' (100 bytes) on this node: 200 of 200 bytes are held by "
                                 "models in use, loading or pinned")
    assert kit.held() == ["pinned@1", "e@1"]
    await kit.runtime.unloads.wait_len(3)
    assert kit.runtime.unloads == ["b@1", "c@1", "d@1"]


async def test_a_model_with_a_request_in_flight_or_a_load_in_progress_is_never_evicted() -> None:
    kit = Kit(capacity=3 * SIZE)
    busy = await kit.acquire("busy")  # a request in flight: not released
    gate = asyncio.Event()
    kit.runtime.plan("loading", LoadPlan(gate=gate))
    loading = asyncio.create_task(kit.acquire("loading"))
    await kit.runtime.loads.wait_len(2)
    await kit.use("idle")
    await kit.use("new")  # busy and loading are older than idle, but idle goes
    assert [kit.cache.has_entry(n, "") for n in ("busy", "loading", "idle", "new")] == [True, True, False, True]
    new = await kit.acquire("new")  # now every copy here is in use or loading
    with pytest.raises(ResourceExhausted) as raised:
        await kit.acquire("another")
    assert str(raised.value) == ("no room for model 'another' (100 bytes) on this node: 300 of 300 bytes are held "
                                 "by models in use, loading or pinned")
    gate.set()
    for entry in (busy, new, await loading):
        kit.cache.release(entry)
    await kit.runtime.unloads.wait_len(1)
    assert kit.runtime.unloads == ["idle@1"] and kit.metrics.evictions == 1


# -- the churn guard -----------------------------------------------------------------------------------


async def test_the_churn_guard_refuses_a_load_that_would_evict_a_recently_used_model() -> None:
    kit = Kit(capacity=2 * SIZE, churn_guard_s=60.0)
    await kit.use("a")
    await kit.use("b")
    with pytest.raises(ResourceExhausted) as raised:
        await kit.acquire("c", churn_guard=True)
    assert str(raised.value) == ("no room for model 'c' (100 bytes) on this node: 200 of 200 bytes are held by "
                                 "models in use, loading, pinned, or used in the last 60s (churn guard)")
    assert kit.changes[-1] == "c"  # told, so a claim for this node in the model record is corrected
    assert kit.held() == ["a@1", "b@1"] and kit.runtime.loads == ["a@1", "b@1"]
    assert kit.cache.load_in_background(source("c"), LoadOptions(SIZE, churn_guard=True), evict=True) is False
    kit.clock.advance(61.0)  # a and b are no longer recent
    await kit.use("c", churn_guard=True)
    assert kit.held() == ["b@1", "c@1"]


async def test_without_the_churn_guard_a_recently_used_model_is_evicted() -> None:
    kit = Kit(capacity=2 * SIZE, churn_guard_s=60.0)
    await kit.use("a")
    await kit.use("b")
    await kit.use("c", churn_guard=False)
    assert kit.held() == ["b@1", "c@1"]


# -- failures ------------------------------------------------------------------------------------------


async def test_a_load_that_times_out_fails_and_its_late_result_is_unloaded() -> None:
    kit = Kit()
    gate = asyncio.Event()
    kit.runtime.plan("slow", LoadPlan(gate=gate))
    with pytest.raises(ModelUnavailable) as raised:  # UNAVAILABLE: it may load in time later or elsewhere
        await kit.acquire("slow", timeout_s=0.05)
    assert str(raised.value) == "loading model 'slow' version 1 timed out after 0.05s"
    assert not kit.cache.has_entry("slow", "")
    assert kit.cache.stats() == CacheStats(capacity_bytes=1_000, used_bytes=0, models_loaded=0, loads_in_progress=0,
                                           lru_time_s=None)
    assert kit.cache.failures.active("slow", "1") and kit.metrics.load_failures == 1
    gate.set()  # the runtime finishes the load nobody waits for any more: it must not leak
    await kit.runtime.unloads.wait_len(1)
    assert kit.runtime.unloads == ["slow@1"]


async def test_the_node_default_load_timeout_applies_when_the_model_has_none() -> None:
    kit = Kit(load_timeout_s=0.05)
    kit.runtime.plan("slow", LoadPlan(gate=asyncio.Event()))
    with pytest.raises(ModelUnavailable, match="^loading model 'slow' version 1 timed out after 0.05s$"):
        await kit.acquire("slow")


async def test_a_failed_load_is_not_retried_within_its_backoff() -> None:
    kit = Kit(backoff_s=30.0)
    kit.runtime.plan("bad", LoadPlan(error=LoadFailed("model 'bad' is corrupt")))
    waiters = await asyncio.gather(kit.acquire("bad"), kit.acquire("bad"), return_exceptions=True)
    assert [str(e) for e in waiters] == ["model 'bad' is corrupt"] * 2  # every waiter gets the load's error
    kit.clock.advance(10.0)
    with pytest.raises(ModelUnavailable) as raised:
        await kit.acquire("bad")
    assert str(raised.value) == "model 'bad' is corrupt (not retried on this node for another 20s)"
    assert kit.cache.load_in_background(source("bad"), LoadOptions(SIZE), evict=True) is False
    assert kit.runtime.loads == ["bad@1"] and kit.cache.failures.count() == 1
    kit.clock.advance(21.0)  # the backoff is over: loaded again, and this time it works
    await kit.use("bad")
    assert kit.runtime.loads == ["bad@1", "bad@1"] and kit.held() == ["bad@1"]
    assert kit.cache.failures.count() == 0


async def test_a_runtime_bug_fails_the_load_with_the_models_name_not_the_node() -> None:
    kit = Kit()
    kit.runtime.plan("buggy", LoadPlan(error=KeyError("weights")))
    with pytest.raises(LoadFailed) as raised:
        await kit.acquire("buggy")
    assert str(raised.value) == "failed to load model 'buggy' version 1: 'weights'"
    await kit.use("other")  # the node goes on loading other models
    assert kit.held() == ["other@1"]


# -- unloads ---------------------------------------------------------------------------------------------


async def test_unload_model_stops_serving_at_once_and_unloads_after_the_last_request() -> None:
    kit = Kit()
    entry = await kit.acquire("a")
    unloading = asyncio.create_task(kit.cache.unload_model("a"))
    await kit.changes.wait(lambda names: names == ["a", "a", "a"])  # loading, loaded, gone
    assert not kit.cache.has_entry("a", "") and kit.cache.ready == {}
    assert kit.cache.used_bytes == 0 and not unloading.done() and kit.runtime.unloads == []
    kit.cache.release(entry)  # the request in flight finishes on the copy it started on
    assert await unloading == 1
    assert kit.runtime.unloads == ["a@1"]


async def test_unload_model_does_not_wait_for_a_request_that_never_finishes_beyond_its_drain_timeout() -> None:
    kit = Kit()
    await kit.acquire("stuck")
    assert await kit.cache.unload_model("stuck", drain_timeout_s=0.05) == 1
    assert kit.runtime.unloads == ["stuck@1"]


async def test_a_model_unloaded_while_it_loads_fails_its_waiters_and_is_unloaded_once_loaded() -> None:
    kit = Kit()
    gate = asyncio.Event()
    kit.runtime.plan("a", LoadPlan(gate=gate))
    waiter = asyncio.create_task(kit.acquire("a"))
    await kit.runtime.loads.wait_len(1)
    assert await kit.cache.unload_model("a") == 1
    assert kit.cache.stats().loads_in_progress == 0
    gate.set()
    with pytest.raises(ModelNotFound, match="^Request for unknown model: 'a' is not found$"):
        await waiter
    await kit.runtime.unloads.wait_len(1)
    assert kit.runtime.unloads == ["a@1"] and kit.cache.used_bytes == 0


async def test_forget_drops_a_copy_the_runtime_lost_and_the_next_request_loads_it_again() -> None:
    kit = Kit()
    entry = await kit.acquire("a")
    kit.cache.forget(entry)
    kit.cache.release(entry)
    assert kit.cache.ready == {} and not kit.cache.has_entry("a", "")
    await kit.use("a")
    assert kit.runtime.loads == ["a@1", "a@1"]


# -- listeners ------------------------------------------------------------------------------------------


async def test_listeners_hear_of_every_load_failure_eviction_and_unload() -> None:
    kit = Kit(capacity=2 * SIZE)
    await kit.use("a")
    assert kit.changes == ["a", "a"]  # loading, loaded
    kit.runtime.plan("bad", LoadPlan(error=LoadFailed("corrupt")))
    with pytest.raises(LoadFailed):
        await kit.acquire("bad")
    assert kit.changes[2:] == ["bad", "bad"]  # loading, failed
    with pytest.raises(ModelUnavailable):
        await kit.acquire("bad")
    assert kit.changes[4:] == ["bad"]  # refused in its backoff: a claim for this node gets corrected
    await kit.use("b")
    await kit.use("c")  # evicts a
    assert kit.changes[5:] == ["b", "b", "a", "c", "c"]
    await kit.cache.unload_model("c")
    assert kit.changes[10:] == ["c"]


async def test_background_loads_need_room_unless_they_may_evict() -> None:
    kit = Kit(capacity=2 * SIZE)
    await kit.use("a")
    await kit.use("b")
    assert kit.cache.load_in_background(source("a"), LoadOptions(SIZE), evict=False) is False  # here already
    assert kit.cache.load_in_background(source("c"), LoadOptions(SIZE), evict=False) is False  # no room
    assert kit.cache.load_in_background(source("c"), LoadOptions(SIZE), evict=True) is True
    await kit.changes.wait(lambda names: names[-2:] == ["c", "c"])
    assert kit.held() == ["b@1", "c@1"] and kit.runtime.loads == ["a@1", "b@1", "c@1"]
