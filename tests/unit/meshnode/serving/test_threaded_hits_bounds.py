"""ThreadedHits at its bounds: run slots, deadlines, a copy unloaded under a request, bad input, many threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from meshnode.errors import DeadlineExceeded, InvalidInput, ModelUnavailable
from router.errors import MeshError
from tests.unit.meshnode.fakes import ME
from tests.unit.meshnode.serving.threaded_kit import (
    QUEUED,
    RUNS,
    CallerModel,
    Kit,
    TimeLeft,
    counted,
    hit,
    inflight,
    loaded,
    no_deadline,
    samples,
    until,
)

pytestmark = pytest.mark.timeout(20)


# -- bounds and waits -------------------------------------------------------------------------------


async def held(kit: Kit, model: CallerModel, count: int, time_remaining: TimeLeft = no_deadline,
               ) -> list[asyncio.Future[bytes | None]]:
    """`count` requests on the copy, counted in flight on it (running or waiting for a run slot)."""
    already = kit.entry().inflight
    calls = [kit.call(hit(id=f"h{i}"), time_remaining=time_remaining) for i in range(count)]
    await until(lambda: kit.entry().inflight == already + count)
    return calls


async def test_a_copy_at_its_bound_and_a_node_at_its_bound_are_left_to_the_loop_path(kit: Kit) -> None:
    model = await loaded(kit, model=CallerModel("m", "1", gate=threading.Event()))
    assert model.gate is not None
    calls = await held(kit, model, RUNS + QUEUED)
    assert await kit.call(hit(id="over the copy's bound")) is None

    kit.dataplane.max_inflight = RUNS + QUEUED
    await loaded(kit, "n")
    assert await kit.call(hit("n", "over the node's bound")) is None
    assert inflight(kit) == (RUNS + QUEUED, RUNS + QUEUED) and inflight(kit, "n")[0] == 0

    model.gate.set()
    answered = await asyncio.gather(*calls)
    assert all(data is not None for data in answered) and inflight(kit) == (0, 0)
    kit.hits.drain()
    assert kit.node.metrics.invoke_count == RUNS + QUEUED


async def test_a_request_past_the_run_slots_waits_for_one_and_the_queue_delay_records_its_wait(kit: Kit) -> None:
    model = await loaded(kit, model=CallerModel("m", "1", gate=threading.Event()))
    assert model.gate is not None
    metrics = kit.node.metrics
    waits_before = metrics.ran_without_waiting
    delays_before = samples(kit, "modelmesh_req_queue_delay_milliseconds_count")[()]
    sum_before = samples(kit, "modelmesh_req_queue_delay_milliseconds_sum")[()]
    calls = await held(kit, model, RUNS)
    await until(lambda: model.running == RUNS)
    calls += await held(kit, model, 1)
    assert model.running == RUNS and len(model.threads) == RUNS  # the third waits for a run slot

    model.gate.set()
    assert all(data is not None for data in await asyncio.gather(*calls))
    kit.hits.drain()

    assert metrics.ran_without_waiting - waits_before == RUNS and model.most_running == RUNS
    # RUNS zeros (the histogram's count of requests that ran without waiting) and one delay observed
    delays = samples(kit, "modelmesh_req_queue_delay_milliseconds_count")[()]
    assert delays - delays_before == RUNS + 1
    assert samples(kit, "modelmesh_req_queue_delay_milliseconds_sum")[()] > sum_before
    [stats] = kit.statistics.report("m")
    assert stats.inference_stats.queue.ns > 0 and stats.execution_count == RUNS + 1


async def test_a_request_that_would_miss_its_deadline_in_the_queue_is_left_to_the_loop_path(kit: Kit) -> None:
    model = await loaded(kit, model=CallerModel("m", "1", gate=threading.Event()))
    assert model.gate is not None
    kit.entry().run_s = 0.2  # as measured: one run ahead, then its own, is about 0.3 s
    calls = await held(kit, model, RUNS)
    before = counted(kit)

    assert await kit.call(hit(id="hurried"), time_remaining=lambda: 0.25) is None
    assert inflight(kit) == (RUNS, RUNS)
    calls += await held(kit, model, 1, time_remaining=lambda: 5.0)  # fits in 5 s: queued

    model.gate.set()
    assert all(data is not None for data in await asyncio.gather(*calls))
    kit.hits.drain()
    assert counted(kit)[2] == before[2] + RUNS + 1


async def test_a_request_whose_deadline_passes_while_it_waits_for_a_slot_fails_deadline_exceeded(kit: Kit) -> None:
    model = await loaded(kit, model=CallerModel("m", "1", gate=threading.Event()))
    assert model.gate is not None
    calls = await held(kit, model, RUNS)  # no run time measured yet: nothing to predict a miss from
    before = counted(kit)

    with pytest.raises(DeadlineExceeded) as late:
        await kit.call(hit(id="late"), time_remaining=lambda: 0.05)

    assert late.value.node == ME and "no free run slot" in str(late.value)
    model.gate.set()
    await asyncio.gather(*calls)
    kit.hits.drain()
    assert counted(kit) == (before[0] + RUNS + 1, before[1] + RUNS + 1, before[2] + RUNS + 1, before[3] + 1)
    assert samples(kit, "modelmesh_invoke_model_milliseconds_count")[
        (("code", "DEADLINE_EXCEEDED"), ("method", "ModelInfer"))] == 1


# -- failures --------------------------------------------------------------------------------------


async def test_a_copy_unloaded_under_the_request_is_left_to_the_loop_path_with_its_counts_restored(kit: Kit) -> None:
    model = await loaded(kit)
    model.errors.append(ModelUnavailable("model 'm' version 1 is unloaded"))
    before = counted(kit)

    assert await kit.call(hit()) is None

    assert inflight(kit) == (0, 0)
    kit.hits.drain()
    assert counted(kit) == before and kit.statistics.report("m") == []


async def test_a_bad_input_raises_its_error_naming_this_node_and_counts_as_a_failure_under_its_code(kit: Kit) -> None:
    model = await loaded(kit)
    model.errors.append(InvalidInput("model 'm': unexpected input 'X'"))
    before = counted(kit)

    with pytest.raises(MeshError) as refused:
        await kit.call(hit())

    assert isinstance(refused.value, InvalidInput) and refused.value.node == ME
    assert inflight(kit) == (0, 0)
    kit.hits.drain()
    assert counted(kit) == (before[0] + 1, before[1] + 1, before[2] + 1, before[3] + 1)
    labels = (("code", "INVALID_ARGUMENT"), ("method", "ModelInfer"))
    assert samples(kit, "modelmesh_invoke_model_milliseconds_count") == {labels: 1}
    assert samples(kit, "modelmesh_api_request_milliseconds_count") == {labels: 1}
    [stats] = kit.statistics.report("m")
    assert (stats.inference_stats.fail.count, stats.inference_stats.success.count) == (1, 0)


# -- concurrency -----------------------------------------------------------------------------------


async def test_many_threads_hitting_at_once_leave_every_count_right(kit: Kit) -> None:
    model = await loaded(kit)
    await loaded(kit, "n")
    kit.entry("n").model = CallerModel("n", "1")
    before = counted(kit)
    names = ("m", "n", "front")

    def many(worker: int) -> int:
        answered = 0
        for i in range(200):
            data = kit.hits.answer(hit(names[(worker + i) % 3], f"{worker}-{i}"), lambda: (), False, 10, no_deadline)
            answered += data is not None
        return answered

    loop = asyncio.get_running_loop()
    answered = sum(await asyncio.gather(*(loop.run_in_executor(kit.workers, many, w) for w in range(8))))

    assert inflight(kit) == (0, 0) and inflight(kit, "n") == (0, 0)
    assert model.most_running <= RUNS
    kit.hits.drain()
    # A request finding its copy at its bound is left to the loop path: only those answered are counted.
    assert answered > 0 and counted(kit) == (before[0] + answered, before[1] + answered, before[2] + answered,
                                             before[3])
    assert kit.entry().requests + kit.entry("n").requests == 2 + answered
