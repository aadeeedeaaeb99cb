"""ThreadedHits: local hits answered on the calling (worker) thread, their bookkeeping applied on the loop.

The real cache, replica, registry and dataplane (NodeParts) under a model that answers on the caller; `answer`
is called from worker threads, as grpcio's threaded server calls it, while the test's loop runs the drains.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshnode.serving.threaded_hits import Forwarded
from meshpb import pb
from router.hop import HOPS_KEY, PARAMETER_KEY, Hop, Mode
from router.sequences import SEQUENCE_ID
from tests.unit.meshnode.fakes import WAIT_S
from tests.unit.meshnode.serving.threaded_kit import (
    CallerModel,
    Kit,
    counted,
    hit,
    inflight,
    loaded,
    no_deadline,
    samples,
)

pytestmark = pytest.mark.timeout(20)


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


async def test_a_request_forwarded_from_a_worker_counts_at_the_drain_as_an_api_request_only(kit: Kit) -> None:
    before, loop = counted(kit), asyncio.get_running_loop()
    await loop.run_in_executor(kit.workers, kit.hits.done, Forwarded("m", 1.0, 1.25, "OK", 10, 40))
    await loop.run_in_executor(kit.workers, kit.hits.done, Forwarded("m", 2.0, 2.5, "INVALID_ARGUMENT", 12, None))
    assert counted(kit) == before  # nothing counted off the loop

    kit.hits.drain()

    # Counted as requests this node took, not as hits or runs here: the peer ran them.
    assert counted(kit) == (before[0] + 2, *before[1:])
    ok, failed = (("code", "OK"), ("method", "ModelInfer")), (("code", "INVALID_ARGUMENT"), ("method", "ModelInfer"))
    assert samples(kit, "modelmesh_api_request_milliseconds_sum") == {ok: 250.0, failed: 500.0}
    assert samples(kit, "modelmesh_request_size_bytes_sum")[failed] == 12
    assert samples(kit, "modelmesh_response_size_bytes_sum") == {ok: 40}


async def test_the_loop_drains_a_hits_bookkeeping_by_itself_soon_after(
        kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    await loaded(kit)
    before = counted(kit)
    drained = asyncio.Event()
    drain = kit.hits.drain
    monkeypatch.setattr(kit.hits, "drain", lambda: (drain(), drained.set()))  # the loop's own call, seen
    assert await kit.call(hit()) is not None
    await asyncio.wait_for(drained.wait(), WAIT_S)
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
