"""DirectCalls on a real grpcio threaded server: ModelInfer taken off its C core by the test's handler, answered
at once or later from another thread, failed with a status and trailing metadata, told of the client's cancel,
more pollers while every one is busy, and every other method still served by grpcio. ModelStreamInfer taken off
it by the same pollers (net.direct_streams): messages both ways in order, from any thread, its status after them,
the client's cancel, and the back-pressure of a client that does not read.

The server listens on 127.0.0.1 (port 0); the test calls it through a grpc.aio channel.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from meshnode.net import transport
from meshnode.net.direct_calls import MIN_POLLERS, DirectCall, DirectCalls, StreamHandle
from meshnode.net.direct_streams import DirectStream
from meshpb import pb
from tests.unit.meshnode.fakes import WAIT_S, rpc_error

pytestmark = pytest.mark.timeout(30)


STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@dataclass
class Served:
    stub: transport.InferenceStub
    direct: DirectCalls
    channel: grpc.aio.Channel

    def stream(self, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
        """A ModelStreamInfer call of raw bytes both ways."""
        return self.channel.stream_stream(STREAM)(metadata=metadata)


async def server_live(request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
    raise AssertionError("the threaded server calls a function")


@asynccontextmanager
async def serving(handle: Callable[[DirectCall], None], max_pollers: int = 8,
                  streams: Mapping[str, StreamHandle] | None = None) -> AsyncIterator[Served]:
    server = transport.create_threaded_server(4)
    direct = transport.serve_directly(server, "ModelInfer", handle, max_pollers, streams)
    transport.add_inference_service(server, {"ServerLive": lambda request, context: pb.ServerLiveResponse(live=True)})
    port = transport.bind(server, "127.0.0.1", 0)
    server.start()
    direct.start()
    channel = transport.create_channel(f"127.0.0.1:{port}")
    try:
        yield Served(transport.InferenceStub(channel), direct, channel)
    finally:
        await channel.close()
        assert await asyncio.to_thread(server.stop(None).wait, WAIT_S)
        await asyncio.to_thread(direct.stop)


def echo(call: DirectCall) -> None:
    request = pb.ModelInferRequest.FromString(call.request)
    call.reply(pb.ModelInferResponse(id=request.id, model_name=threading.current_thread().name).SerializeToString())


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


# -- streams ---------------------------------------------------------------------------------------


class Echo:
    """A stream handler that answers each request with its bytes (`times` times), reads the next, and ends the
    stream OK once the client sent its last; what it saw of the call is kept."""

    def __init__(self, stream: DirectStream, times: int = 1) -> None:
        self.stream = stream
        self.times = times
        self.who = dict(stream.invocation_metadata()).get("who")
        self.pollers = {threading.current_thread().name}
        stream.serve(self, 64)
        stream.read()

    def on_request(self, data: bytes | None) -> None:
        self.pollers.add(threading.current_thread().name)
        if data is None:
            self.stream.finish()
            return
        for _ in range(self.times):
            self.stream.send(data)
        self.stream.read()

    def on_room(self) -> None:
        pass


def streams_of(handle: Callable[[DirectStream], object]) -> dict[str, StreamHandle]:
    """ModelStreamInfer's new calls to `handle` (a handler's class, or a function)."""
    def opened(stream: DirectStream) -> None:
        handle(stream)

    return {"ModelStreamInfer": opened}


async def test_a_streams_messages_go_both_ways_in_order_beside_the_unary_method() -> None:
    echoes: list[Echo] = []
    async with serving(echo, streams=streams_of(lambda stream: echoes.append(Echo(stream, times=2)))) as served:
        call = served.stream(metadata=(("who", "me"),))
        sent = [str(i).encode() * (i % 50 + 1) for i in range(300)]

        async def write() -> None:
            for data in sent:
                await call.write(data)
            await call.done_writing()

        writing = asyncio.create_task(write())
        received = [data async for data in call]
        await writing
        unary = await served.stub.ModelInfer(pb.ModelInferRequest(id="beside"))
        assert await call.code() == grpc.StatusCode.OK
    assert received == [data for data in sent for _ in range(2)]
    assert unary.id == "beside"
    (echoed,) = echoes
    assert echoed.who == "me" and echoed.pollers == {"grpc-direct"}


async def test_a_stream_the_client_half_closes_at_once_ends_ok_without_messages() -> None:
    async with serving(echo, streams=streams_of(Echo)) as served:
        call = served.stream()
        await call.done_writing()
        received = [data async for data in call]
        assert await call.code() == grpc.StatusCode.OK
    assert received == []


class Failing:
    """Answers two requests, then ends the stream with an error, its details and trailing metadata."""

    def __init__(self, stream: DirectStream) -> None:
        self.stream = stream
        self.seen = 0
        stream.serve(self, 64)
        stream.read()

    def on_request(self, data: bytes | None) -> None:
        assert data is not None
        self.seen += 1
        self.stream.send(data)
        if self.seen == 2:
            self.stream.finish(grpc.StatusCode.NOT_FOUND, "model 'gone' is not found", (("meshserve-node", "n7"),))
        else:
            self.stream.read()

    def on_room(self) -> None:
        pass


async def test_a_streams_failure_carries_its_status_and_trailing_metadata_after_its_messages() -> None:
    async with serving(echo, streams=streams_of(Failing)) as served:
        call = served.stream()
        for data in (b"a", b"b"):
            await call.write(data)
        received = [await call.read(), await call.read()]
        failed = await rpc_error(call.read())
    assert received == [b"a", b"b"]
    assert (failed.code(), failed.details()) == (grpc.StatusCode.NOT_FOUND, "model 'gone' is not found")
    assert ("meshserve-node", "n7") in tuple(failed.trailing_metadata() or ())


async def test_a_streams_messages_and_end_may_be_sent_from_another_thread() -> None:
    count = 200

    def from_a_thread(stream: DirectStream) -> None:
        def send() -> None:
            for i in range(count):
                stream.send(str(i).encode())
            stream.finish()

        threading.Thread(target=send).start()

    async with serving(echo, streams=streams_of(from_a_thread)) as served:
        call = served.stream()
        await call.done_writing()
        received = [data async for data in call]
        assert await call.code() == grpc.StatusCode.OK
    assert received == [str(i).encode() for i in range(count)]


@dataclass
class Watched:
    """A stream handler that reads one request and waits; records that it read it, and the stream's cancel."""

    loop: asyncio.AbstractEventLoop
    read: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def open(self, stream: DirectStream) -> None:
        stream.serve(self, 64)
        stream.on_cancel(lambda: self.loop.call_soon_threadsafe(self.cancelled.set))
        stream.read()

    def on_request(self, data: bytes | None) -> None:
        self.loop.call_soon_threadsafe(self.read.set)

    def on_room(self) -> None:
        pass


async def test_a_stream_the_client_cancels_calls_its_cancel_callback() -> None:
    watched = Watched(asyncio.get_running_loop())
    async with serving(echo, streams=streams_of(watched.open)) as served:
        call = served.stream()
        await call.write(b"first")
        await asyncio.wait_for(watched.read.wait(), WAIT_S)
        call.cancel()
        await asyncio.wait_for(watched.cancelled.wait(), WAIT_S)


class Flooding:
    """Sends responses until its backlog reaches the window, and the rest as room comes; records whether the client
    had started reading each time room came. A response is larger than what the client's transport takes in
    unread (about 4 MB here), so none is written before the client reads."""

    WINDOW = 2
    COUNT = 5
    SIZE = 16 << 20

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.full = asyncio.Event()
        self.client_reads = threading.Event()
        self.rooms: list[bool] = []
        self.sent = 0
        self.stream: DirectStream | None = None

    def open(self, stream: DirectStream) -> None:
        self.stream = stream
        stream.serve(self, self.WINDOW)
        self.send_until_full()

    def send_until_full(self) -> None:
        assert self.stream is not None
        while self.sent < self.COUNT:
            self.sent += 1
            if self.stream.send(bytes([self.sent]) * self.SIZE) >= self.WINDOW:
                self.loop.call_soon_threadsafe(self.full.set)
                return
        self.stream.finish()

    def on_request(self, data: bytes | None) -> None:
        pass

    def on_room(self) -> None:
        self.rooms.append(self.client_reads.is_set())
        self.send_until_full()


async def test_a_client_that_does_not_read_fills_the_backlog_and_room_comes_only_once_it_reads() -> None:
    flooding = Flooding(asyncio.get_running_loop())
    async with serving(echo, streams=streams_of(flooding.open)) as served:
        call = served.stream()
        await asyncio.wait_for(flooding.full.wait(), WAIT_S)
        assert flooding.stream is not None and flooding.stream.backlog() == Flooding.WINDOW
        flooding.client_reads.set()
        received = [data async for data in call]
        assert await call.code() == grpc.StatusCode.OK
    assert [data[0] for data in received] == list(range(1, Flooding.COUNT + 1))
    assert flooding.rooms and all(flooding.rooms)
