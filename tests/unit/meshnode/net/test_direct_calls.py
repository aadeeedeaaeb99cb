"""DirectCalls on a real grpcio threaded server: ModelInfer taken off its C core by the test's handler, answered
at once or later from another thread, failed with a status and trailing metadata, told of the client's cancel,
more pollers while every one is busy, and every other method still served by grpcio.

The server listens on 127.0.0.1 (port 0); the test calls it through a grpc.aio channel.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from meshnode.net import transport
from meshnode.net.direct_calls import MIN_POLLERS, DirectCall, DirectCalls
from meshpb import pb
from tests.unit.meshnode.fakes import WAIT_S

pytestmark = pytest.mark.timeout(30)


@dataclass
class Served:
    stub: transport.InferenceStub
    direct: DirectCalls


async def server_live(request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
    raise AssertionError("the threaded server calls a function")


@asynccontextmanager
async def serving(handle: Callable[[DirectCall], None], max_pollers: int = 8) -> AsyncIterator[Served]:
    server = transport.create_threaded_server(4)
    direct = transport.serve_directly(server, "ModelInfer", handle, max_pollers)
    transport.add_inference_service(server, {"ServerLive": lambda request, context: pb.ServerLiveResponse(live=True)})
    port = transport.bind(server, "127.0.0.1", 0)
    server.start()
    direct.start()
    channel = transport.create_channel(f"127.0.0.1:{port}")
    try:
        yield Served(transport.InferenceStub(channel), direct)
    finally:
        await channel.close()
        assert await asyncio.to_thread(server.stop(None).wait, WAIT_S)
        await asyncio.to_thread(direct.stop)


def echo(call: DirectCall) -> None:
    request = pb.ModelInferRequest.FromString(call.request)
    call.reply(pb.ModelInferResponse(id=request.id, model_name=threading.current_thread().name).SerializeToString())


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return failed.value


async def test_a_call_is_answered_on_the_poller_that_took_it_and_other_methods_by_grpcio() -> None:
    async with serving(echo) as served:
        response = await served.stub.ModelInfer(pb.ModelInferRequest(model_name="m", id="a"))
        live = await served.stub.ServerLive(pb.ServerLiveRequest())
    assert (response.id, response.model_name) == ("a", "grpc-direct") and live.live


async def test_a_failure_carries_its_status_message_and_trailing_metadata() -> None:
    def refuse(call: DirectCall) -> None:
        call.fail(grpc.StatusCode.NOT_FOUND, "model 'm' is not found", (("meshserve-node", "n7"),))

    async with serving(refuse) as served:
        refused = await rpc_error(served.stub.ModelInfer(pb.ModelInferRequest(model_name="m")))
    assert (refused.code(), refused.details()) == (grpc.StatusCode.NOT_FOUND, "model 'm' is not found")
    assert ("meshserve-node", "n7") in tuple(refused.trailing_metadata() or ())


async def test_a_handler_that_raises_answers_internal_and_its_poller_serves_on() -> None:
    def buggy(call: DirectCall) -> None:
        if pb.ModelInferRequest.FromString(call.request).id == "bug":
            raise ValueError("a bug")
        echo(call)

    async with serving(buggy, max_pollers=MIN_POLLERS) as served:
        bugs = [await rpc_error(served.stub.ModelInfer(pb.ModelInferRequest(id="bug"))) for _ in range(MIN_POLLERS)]
        after = await served.stub.ModelInfer(pb.ModelInferRequest(id="after"))
    assert {(b.code(), b.details()) for b in bugs} == {(grpc.StatusCode.INTERNAL, "unexpected error on the server")}
    assert after.id == "after"


async def test_an_answer_may_come_later_from_another_thread_with_the_calls_metadata_and_deadline() -> None:
    seen: list[tuple[Any, float | None]] = []

    def later(call: DirectCall) -> None:
        seen.append((dict(call.invocation_metadata()).get("who"), call.time_remaining()))
        threading.Timer(0.01, echo, (call,)).start()

    async with serving(later) as served:
        first = await served.stub.ModelInfer(pb.ModelInferRequest(id="a"), metadata=(("who", "me"),))
        second = await served.stub.ModelInfer(pb.ModelInferRequest(id="b"), timeout=20.0)
    assert (first.id, second.id) == ("a", "b")
    (who, without), (_, within) = seen
    assert who == "me" and without is None
    assert within is not None and 15.0 < within <= 21.0  # the core's deadline may be a little past the client's


@dataclass
class Unanswered:
    """A handler that answers nothing and records when its call ended unanswered."""

    loop: asyncio.AbstractEventLoop
    taken: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, call: DirectCall) -> None:
        call.on_cancel(lambda: self.loop.call_soon_threadsafe(self.cancelled.set))
        self.loop.call_soon_threadsafe(self.taken.set)


async def test_a_call_the_client_cancels_calls_its_cancel_callback() -> None:
    unanswered = Unanswered(asyncio.get_running_loop())
    async with serving(unanswered) as served:
        call = served.stub.ModelInfer(pb.ModelInferRequest())
        await asyncio.wait_for(unanswered.taken.wait(), WAIT_S)
        call.cancel()
        await asyncio.wait_for(unanswered.cancelled.wait(), WAIT_S)


async def test_a_call_whose_deadline_passes_calls_its_cancel_callback() -> None:
    unanswered = Unanswered(asyncio.get_running_loop())
    async with serving(unanswered) as served:
        late = await rpc_error(served.stub.ModelInfer(pb.ModelInferRequest(), timeout=0.3))
        await asyncio.wait_for(unanswered.cancelled.wait(), WAIT_S)
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_an_answered_call_does_not_call_its_cancel_callback() -> None:
    cancelled: list[str] = []

    def answered(call: DirectCall) -> None:
        call.on_cancel(lambda: cancelled.append("cancelled"))
        echo(call)

    async with serving(answered) as served:
        for _ in range(3):
            await served.stub.ModelInfer(pb.ModelInferRequest())
    assert cancelled == []


async def test_while_every_poller_is_busy_another_one_takes_the_next_call() -> None:
    busy = MIN_POLLERS + 2
    arrived = threading.Barrier(busy)

    def blocking(call: DirectCall) -> None:
        arrived.wait(WAIT_S)  # raises BrokenBarrierError unless `busy` calls are in handlers at once
        echo(call)

    async with serving(blocking, max_pollers=busy) as served:
        answers = await asyncio.gather(*(served.stub.ModelInfer(pb.ModelInferRequest(id=str(i)))
                                         for i in range(busy)))
        pollers = [t for t in threading.enumerate() if t.name == "grpc-direct"]
    assert sorted(a.id for a in answers) == [str(i) for i in range(busy)]
    assert len(pollers) <= busy + 1
    assert not any(t.is_alive() for t in pollers)  # stop ended them
