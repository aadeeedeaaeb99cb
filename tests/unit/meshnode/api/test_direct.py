"""DirectInfer on a real grpcio threaded server's direct lane (net.direct_calls): a local hit answered on the
poller, anything else on the test's loop after the hits so far are counted, errors with their status and node, a
refused caller never served, and a call that ends while on the loop cancels its task there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import pytest

from meshnode.api.access import Access, Credentials, Role
from meshnode.api.direct import DirectInfer, InferHandler
from meshnode.errors import InvalidInput
from meshnode.net import transport
from meshnode.runtimes.base import CallerMetadata
from meshnode.serving.dataplane import INFER, TRIED_ALREADY
from meshnode.serving.threaded_forwards import NOT_TAKEN, Declined, ThreadedForwards
from meshnode.serving.threaded_hits import ThreadedHits
from meshpb import pb
from router.errors import NODE_KEY
from tests.unit.meshnode.fakes import WAIT_S, rpc_error

pytestmark = pytest.mark.timeout(30)

TOKEN = b"reader-token"


@dataclass
class Hits:
    """ThreadedHits as DirectInfer calls it: "fast" is answered on the poller, "bad" refused, others not hits."""

    asked: list[tuple[str, bool, int, float | None]] = field(default_factory=list)
    drains: int = 0

    def answer(self, request: pb.ModelInferRequest, metadata: CallerMetadata, member: bool, request_bytes: int,
               time_remaining: Callable[[], float | None]) -> bytes | None:
        self.asked.append((request.id, member, request_bytes, time_remaining()))
        if request.id == "bad":
            error = InvalidInput("unexpected input 'X'")
            error.node = "n7"
            raise error
        if request.id == "fast":
            return pb.ModelInferResponse(model_name=request.model_name, id="fast").SerializeToString()
        return None

    def drain(self) -> None:
        self.drains += 1


@dataclass
class Forwards:
    """ThreadedForwards as DirectInfer calls it: "far" is answered by a peer from the poller, others not forwards."""

    asked: list[tuple[str, bytes, float | None]] = field(default_factory=list)

    def forward(self, request: pb.ModelInferRequest, data: bytes, metadata: CallerMetadata,
                time_remaining: Callable[[], float | None]) -> bytes | Declined:
        self.asked.append((request.id, data, time_remaining()))
        if request.id == "far":
            return pb.ModelInferResponse(model_name=request.model_name, id="from a peer").SerializeToString()
        if request.id == "moved":
            return Declined(("n9",))  # its copy on n9 failed it: the loop path serves it, skipping n9
        return NOT_TAKEN


@asynccontextmanager
async def serving(handler: InferHandler, hits: Hits, access: Access | None = None,
                  forwards: Forwards | None = None) -> AsyncIterator[grpc.aio.Channel]:
    server = transport.create_threaded_server(4)
    infer = DirectInfer(loop=asyncio.get_running_loop(), access=access or Access(members=True),
                        hits=cast(ThreadedHits, hits), forwards=cast(ThreadedForwards, forwards or Forwards()),
                        handler=handler)
    direct = transport.serve_directly(server, INFER, infer, 8)
    port = transport.bind(server, "127.0.0.1", 0)
    server.start()
    direct.start()
    channel = transport.create_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        assert await asyncio.to_thread(server.stop(None).wait, WAIT_S)
        await asyncio.to_thread(direct.stop)


async def test_a_hit_is_answered_on_the_poller_and_anything_else_on_the_loop_after_a_drain() -> None:
    hits = Hits()
    on_loop: list[tuple[str, int]] = []

    async def model_infer(request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        on_loop.append((request.id, hits.drains))
        return pb.ModelInferResponse(model_name=request.model_name, id="loop")

    fast, slow, bad = (pb.ModelInferRequest(model_name="m", id=id) for id in ("fast", "slow", "bad"))
    async with serving(model_infer, hits) as channel:
        stub = transport.InferenceStub(channel)
        assert (await stub.ModelInfer(fast)).id == "fast"
        assert on_loop == []
        assert (await stub.ModelInfer(slow, timeout=20.0)).id == "loop"
        refused = await rpc_error(stub.ModelInfer(bad))

    assert on_loop == [("slow", 1)]  # the hits so far were drained before the loop's handler ran
    (fast_id, member, size, without), (_, _, _, within), bad_asked = hits.asked
    assert (fast_id, member, size, without) == ("fast", True, fast.ByteSize(), None)
    assert within is not None and 15.0 < within <= 21.0 and bad_asked[0] == "bad"
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.details() == "unexpected input 'X'"
    assert (NODE_KEY, "n7") in tuple(refused.trailing_metadata() or ())


async def test_a_request_a_peer_answers_is_replied_on_the_poller_and_a_hit_never_offered_to_the_forwards() -> None:
    hits, forwards = Hits(), Forwards()
    on_loop: list[tuple[str, tuple[str, ...]]] = []

    async def model_infer(request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        on_loop.append((request.id, TRIED_ALREADY.get()))
        return pb.ModelInferResponse(model_name=request.model_name, id="loop")

    far, fast, slow, moved = (pb.ModelInferRequest(model_name="m", id=id) for id in ("far", "fast", "slow", "moved"))
    async with serving(model_infer, hits, forwards=forwards) as channel:
        stub = transport.InferenceStub(channel)
        assert (await stub.ModelInfer(far, timeout=20.0)).id == "from a peer"
        assert (await stub.ModelInfer(fast)).id == "fast"
        assert (await stub.ModelInfer(moved)).id == "loop"
        assert (await stub.ModelInfer(slow)).id == "loop"

    # The forwarded request never reached the loop's handler; one a peer failed did, knowing whom it tried.
    assert on_loop == [("moved", ("n9",)), ("slow", ())]
    assert [request_id for request_id, *_ in hits.asked] == ["far", "fast", "moved", "slow"]  # a hit first
    (far_id, data, within), _, (slow_id, _, without) = forwards.asked  # the hit was not offered
    assert (far_id, slow_id, without) == ("far", "slow", None)
    assert data == far.SerializeToString()  # the request's bytes as the client sent them
    assert within is not None and 15.0 < within <= 21.0


async def test_errors_on_the_loop_arrive_with_their_status_and_a_bug_as_internal() -> None:
    async def model_infer(request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        raise ValueError("a bug")

    async with serving(model_infer, Hits()) as channel:
        bug = await rpc_error(transport.InferenceStub(channel).ModelInfer(pb.ModelInferRequest(model_name="m")))
    assert bug.code() == grpc.StatusCode.INTERNAL and bug.details() == "internal error: ValueError: a bug"


async def test_a_refused_caller_is_never_served() -> None:
    hits = Hits()

    async def model_infer(request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        raise AssertionError("a refused call reached the loop")

    access = Access(members=False, credentials=Credentials(((TOKEN, Role.READER),)), require_for_infer=True)
    async with serving(model_infer, hits, access) as channel:
        stub = transport.InferenceStub(channel)
        refused = await rpc_error(stub.ModelInfer(pb.ModelInferRequest(model_name="m", id="fast")))
        served = await stub.ModelInfer(pb.ModelInferRequest(model_name="m", id="fast"),
                                       metadata=(("authorization", "Bearer " + TOKEN.decode()),))
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED and served.id == "fast"
    assert [(request_id, member) for request_id, member, _, _ in hits.asked] == [("fast", False)]


async def test_a_request_that_does_not_parse_is_grpcios_internal_error() -> None:
    async def model_infer(request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        raise AssertionError("unreachable")

    async with serving(model_infer, Hits()) as channel:
        raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer")
        broken = await rpc_error(raw(b"\xff\xff\xff"))
    assert (broken.code(), broken.details()) == (grpc.StatusCode.INTERNAL, "Exception deserializing request!")


async def test_a_call_that_ends_while_on_the_loop_cancels_its_task() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def model_infer(request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        started.set()
        try:
            await asyncio.sleep(WAIT_S * 2)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("not cancelled")

    async with serving(model_infer, Hits()) as channel:
        call = transport.InferenceStub(channel).ModelInfer(pb.ModelInferRequest(model_name="m", id="slow"))
        await asyncio.wait_for(started.wait(), WAIT_S)
        call.cancel()
        await asyncio.wait_for(cancelled.wait(), WAIT_S)
