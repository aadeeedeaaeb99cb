"""ThreadedHits: local hits answered on the calling (worker) thread, their bookkeeping applied on the loop.

The real cache, replica, registry and dataplane (NodeParts) under a model that answers on the caller; `answer`
is called from worker threads, as grpcio's threaded server calls it, while the test's loop runs the drains.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshnode.errors import DeadlineExceeded, InvalidInput, ModelUnavailable
from meshnode.runtimes.base import CallerMetadata, TensorSpec
from meshnode.serving.dataplane import DataPlane
from meshnode.serving.entries import CachedModel
from meshnode.serving.statistics import ModelStatistics
from meshnode.serving.threaded_hits import ThreadedHits
from meshpb import pb
from router.errors import MeshError
from router.hop import HOPS_KEY, PARAMETER_KEY, Hop, Mode
from router.sequences import SEQUENCE_ID
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import INPUTS, ME, OUTPUTS, SIZE, WAIT_S, FakeRouter, NodeParts

pytestmark = pytest.mark.timeout(20)

RUNS, QUEUED, MAX_INFLIGHT = 2, 3, 64
TimeLeft = Callable[[], float | None]


def no_deadline() -> float | None:
    return None


@dataclass(eq=False)
class CallerModel:
    """A loaded model that answers on the calling thread (runtimes.base.AnswersOnCaller); `gate` holds its runs."""

    name: str
    version: str
    size_bytes: int = SIZE
    platform: str = "onnxruntime_onnx"
    inputs: tuple[TensorSpec, ...] = INPUTS
    outputs: tuple[TensorSpec, ...] = OUTPUTS
    on_caller: bool = True
    gate: threading.Event | None = None
    errors: list[BaseException] = field(default_factory=list)  # raised by the next runs, in order
    threads: list[str] = field(default_factory=list)  # the thread of every run
    running: int = 0
    most_running: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def infer_now(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        with self._lock:
            self.threads.append(threading.current_thread().name)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            if self.gate is not None:
                assert self.gate.wait(WAIT_S), "the test never opened the gate"
            with self._lock:
                error = self.errors.pop(0) if self.errors else None
            if error is not None:
                raise error
            return pb.ModelInferResponse(model_name=self.name, model_version=self.version, id=request.id)
        finally:
            with self._lock:
                self.running -= 1

    async def infer(self, request: pb.ModelInferRequest, timeout_s: float | None = None,
                    caller_metadata: CallerMetadata | None = None) -> pb.ModelInferResponse:
        return self.infer_now(request)


@dataclass
class Kit:
    node: NodeParts
    dataplane: DataPlane
    statistics: ModelStatistics
    hits: ThreadedHits
    workers: ThreadPoolExecutor  # the server's worker threads

    def call(self, request: pb.ModelInferRequest, metadata: Iterable[tuple[str, str]] = (), member: bool = False,
             time_remaining: TimeLeft = no_deadline, request_bytes: int = 10) -> asyncio.Future[bytes | None]:
        """`answer` on a worker thread, as the threaded server calls it."""
        entries = tuple(metadata)
        return asyncio.get_running_loop().run_in_executor(self.workers, functools.partial(
            self.hits.answer, request, lambda: entries, member, request_bytes, time_remaining))

    def entry(self, name: str = "m") -> CachedModel:
        return self.node.cache.ready[(name, "")]


@pytest.fixture
async def kit(tmp_path: Path) -> AsyncIterator[Kit]:
    node = await NodeParts(FakeStore(), tmp_path / "repo", runs_per_copy=RUNS, max_queued=QUEUED).start(mesh=False)
    dataplane = DataPlane(replica=node.replica, router=FakeRouter().router, cache=node.cache, registry=node.registry,
                          alias_targets={}, metadata_elsewhere=_no_metadata, metrics=node.metrics, version="1",
                          max_inflight=MAX_INFLIGHT)
    statistics = ModelStatistics(node.clock)
    hits = ThreadedHits(cache=node.cache, dataplane=dataplane, alias_targets={"front": "m"},
                        records=node.registry.view, metrics=node.metrics, statistics=statistics, instance_id=ME,
                        loop=asyncio.get_running_loop())
    workers = ThreadPoolExecutor(32, thread_name_prefix="worker")
    yield Kit(node, dataplane, statistics, hits, workers)
    workers.shutdown(wait=True)  # every run is bounded (CallerModel's gate waits at most WAIT_S)
    await node.stop()


async def _no_metadata(name: str, version: str) -> pb.ModelMetadataResponse | None:
    return None


async def loaded(kit: Kit, name: str = "m", model: CallerModel | None = None, **fields: Any) -> CallerModel:
    """A copy of `name` here (one request served by the loop path in its load) whose model answers on the caller."""
    await kit.node.register(name, **fields)
    await kit.node.use(name)
    model = model or CallerModel(name, "1")
    kit.entry(name).model = model
    return model


async def until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:  # noqa: ASYNC109
    """Wait until `predicate()` holds: what worker threads change, the loop can only look at again."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - worker threads signal nothing the loop could wait on
            await asyncio.sleep(0.002)


def counted(kit: Kit) -> tuple[int, int, int, int]:
    metrics = kit.node.metrics
    return metrics.api_requests, metrics.cache_hits, metrics.invoke_count, metrics.invoke_failures


def inflight(kit: Kit, name: str = "m") -> tuple[int, int]:
    return kit.entry(name).inflight, kit.dataplane.inflight


def samples(kit: Kit, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The rendered metric's samples called `name`, by their labels."""
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(kit.node.metrics.render().decode())
            for s in family.samples if s.name == name}


def hit(model_name: str = "m", id: str = "r") -> pb.ModelInferRequest:  # noqa: A002
    return pb.ModelInferRequest(model_name=model_name, id=id)


# -- a hit ------------------------------------------------------------------------------------------


def answered_while_the_loop_waits(kit: Kit, request: pb.ModelInferRequest) -> bytes | None:
    """`answer` on a worker while this (the loop's) thread waits for it: no drain can run meanwhile."""
    return kit.workers.submit(kit.hits.answer, request, lambda: (), False, 10, no_deadline).result(WAIT_S)


async def test_a_hit_is_answered_on_the_worker_and_its_bookkeeping_waits_for_the_loops_drain(kit: Kit) -> None:
    node = kit.node
    model = await loaded(kit)
    node.clock.advance(10)
    await loaded(kit, "other")  # used after m: m is now the least recently used copy
    node.clock.advance(10)
    assert node.cache.stats().lru_time_s == node.clock.now - 20
    before = counted(kit)

    data = answered_while_the_loop_waits(kit, hit(id="r1"))

    assert data is not None
    response = pb.ModelInferResponse.FromString(data)
    assert (response.model_name, response.model_version, response.id) == ("m", "1", "r1")
    assert model.threads[0].startswith("worker")
    assert inflight(kit) == (0, 0)  # counted down on the worker at once
    # What the loop owns is left to the loop.
    assert counted(kit) == before and kit.entry().requests == 1 and kit.statistics.report("m") == []

    kit.hits.drain()

    assert counted(kit) == (before[0] + 1, before[1] + 1, before[2] + 1, before[3])
    assert kit.entry().requests == 2 and kit.entry().run_s > 0
    assert node.cache.stats().lru_time_s == node.clock.now - 10  # m was used last: "other" is the oldest now
    [stats] = kit.statistics.report("m")
    assert (stats.inference_count, stats.execution_count, stats.inference_stats.success.count) == (1, 1, 1)
    assert samples(kit, "modelmesh_api_request_milliseconds_count") == {(("code", "OK"), ("method", "ModelInfer")): 1}
    assert samples(kit, "modelmesh_request_size_bytes_sum")[(("code", "OK"), ("method", "ModelInfer"))] == 10
    assert samples(kit, "modelmesh_response_size_bytes_sum")[(("code", "OK"), ("method", "ModelInfer"))] == len(data)
    assert samples(kit, "modelmesh_invoke_model_milliseconds_count") == {
        (("code", "OK"), ("method", "ModelInfer")): 1}


async def test_the_loop_drains_a_hits_bookkeeping_by_itself_soon_after(kit: Kit) -> None:
    await loaded(kit)
    before = counted(kit)
    assert await kit.call(hit()) is not None
    await until(lambda: counted(kit)[0] == before[0] + 1)
    assert counted(kit) == (before[0] + 1, before[1] + 1, before[2] + 1, before[3])
    assert kit.entry().requests == 2


async def test_an_alias_is_answered_by_its_models_copy_in_its_models_name(kit: Kit) -> None:
    await loaded(kit)
    request = hit("front")
    data = await kit.call(request)
    assert data is not None and pb.ModelInferResponse.FromString(data).model_name == "m"
    assert request.model_name == "m"  # the loop's bookkeeping labels it so too


async def test_a_members_hop_is_answered_here(kit: Kit) -> None:
    model = await loaded(kit)
    request = hit()
    request.parameters[PARAMETER_KEY].string_param = Hop(1, ("n1",), Mode.COPY).encode()
    assert await kit.call(request, Hop(1, ("n1",), Mode.COPY).to_metadata(), member=True) is not None
    assert len(model.threads) == 1


# -- not a hit: the loop path decides --------------------------------------------------------------


def with_parameter(request: pb.ModelInferRequest, key: str, value: str) -> pb.ModelInferRequest:
    request.parameters[key].string_param = value
    return request


@pytest.mark.parametrize(("fields", "model", "request_", "metadata"), [
    pytest.param({}, CallerModel("m", "1"), hit("absent"), (), id="no copy here"),
    pytest.param({}, CallerModel("m", "1"), with_parameter(hit(), SEQUENCE_ID, "s1"), (), id="a sequence"),
    pytest.param({"timeout_ms": 500}, CallerModel("m", "1"), hit(), (), id="a registered timeout"),
    pytest.param({}, CallerModel("m", "1"), with_parameter(hit(), PARAMETER_KEY, Hop(1).encode()), (),
                 id="a non-member's hop parameter"),
    pytest.param({}, CallerModel("m", "1"), hit(), ((HOPS_KEY, "1"),), id="a non-member's hop metadata"),
    pytest.param({}, CallerModel("m", "1", on_caller=False), hit(), (), id="a model that answers on the loop only"),
    pytest.param({}, None, hit(), (), id="a model without infer_now"),
])
async def test_what_is_not_a_local_hit_is_left_to_the_loop_path_uncounted(
        kit: Kit, fields: dict[str, Any], model: CallerModel | None, request_: pb.ModelInferRequest,
        metadata: tuple[tuple[str, str], ...]) -> None:
    await kit.node.register("m", **fields)
    await kit.node.use("m")
    if model is not None:
        kit.entry().model = model
    before, requests = counted(kit), kit.entry().requests

    assert await kit.call(request_, metadata) is None

    kit.hits.drain()
    assert counted(kit) == before and kit.entry().requests == requests and inflight(kit) == (0, 0)
    assert model is None or model.threads == []


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
