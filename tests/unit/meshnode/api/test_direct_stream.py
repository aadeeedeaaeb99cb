"""DirectStreamInfer on a real grpcio threaded server's direct lane (net.direct_calls, net.direct_streams): the
handler runs on the test's loop after the hits so far are counted, its responses reach the client in order (many
per request too), its errors end the stream with their status and node, a refused caller is never served, a
stream that ends early cancels its task, and requests are read at most STREAM_WINDOW ahead of a slow handler.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import pytest

from meshnode.api.access import Access, Credentials, Role
from meshnode.api.direct_stream import STREAM_WINDOW, DirectStreamInfer, StreamInferHandler
from meshnode.errors import ModelNotFound
from meshnode.net import transport
from meshnode.net.direct_calls import DirectCall
from meshnode.net.direct_streams import DirectStream, StreamHandler
from meshnode.serving.dataplane import INFER
from meshnode.serving.threaded_hits import ThreadedHits
from meshpb import pb
from router.errors import NODE_KEY
from tests.unit.meshnode.fakes import WAIT_S, Log, rpc_error

pytestmark = pytest.mark.timeout(30)

TOKEN = b"reader-token"
Requests = AsyncIterator[pb.ModelInferRequest]
Responses = AsyncGenerator[pb.ModelStreamInferResponse, None]


@dataclass
class Hits:
    """ThreadedHits as DirectStreamInfer calls it: only its drain."""

    drains: int = 0

    def drain(self) -> None:
        self.drains += 1


class Counted:
    """A stream as DirectStreamInfer sees it, which counts the requests the pollers hand its handler."""

    def __init__(self, stream: DirectStream, loop: asyncio.AbstractEventLoop) -> None:
        self.stream = stream
        self.loop = loop
        self.requests: Log[bytes] = Log()
        self._handler: StreamHandler | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def serve(self, handler: StreamHandler, window: int) -> None:
        self._handler = handler
        self.stream.serve(self, window)

    def on_request(self, data: bytes | None) -> None:
        assert self._handler is not None
        if data is not None:
            self.loop.call_soon_threadsafe(self.requests.append, data)
        self._handler.on_request(data)

    def on_room(self) -> None:
        assert self._handler is not None
        self._handler.on_room()


@dataclass
class Served:
    channel: grpc.aio.Channel
    opened: asyncio.Queue[Counted]

    @property
    def stub(self) -> transport.InferenceStub:
        return transport.InferenceStub(self.channel)


def unary(call: DirectCall) -> None:
    call.reply(pb.ModelInferResponse(id="unary").SerializeToString())


@asynccontextmanager
async def serving(handler: StreamInferHandler, hits: Hits | None = None,
                  access: Access | None = None) -> AsyncIterator[Served]:
    loop = asyncio.get_running_loop()
    server = transport.create_threaded_server(4)
    infer = DirectStreamInfer(loop=loop, access=access or Access(members=True),
                              hits=cast(ThreadedHits, hits or Hits()), handler=handler)
    opened: asyncio.Queue[Counted] = asyncio.Queue()

    def open_stream(stream: DirectStream) -> None:
        counted = Counted(stream, loop)
        infer(cast(DirectStream, counted))
        loop.call_soon_threadsafe(opened.put_nowait, counted)

    direct = transport.serve_directly(server, INFER, unary, 8, {"ModelStreamInfer": open_stream})
    port = transport.bind(server, "127.0.0.1", 0)
    server.start()
    direct.start()
    channel = transport.create_channel(f"127.0.0.1:{port}")
    try:
        yield Served(channel, opened)
    finally:
        await channel.close()
        assert await asyncio.to_thread(server.stop(None).wait, WAIT_S)
        await asyncio.to_thread(direct.stop)


def response(id: str) -> pb.ModelStreamInferResponse:  # noqa: A002
    return pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(id=id))


def requests_of(count: int) -> list[pb.ModelInferRequest]:
    return [pb.ModelInferRequest(model_name="m", id=str(i) * (i + 1)) for i in range(count)]


async def test_responses_reach_the_client_in_order_many_per_request_after_the_hits_are_drained() -> None:
    hits = Hits()
    seen: list[tuple[str, int, int, asyncio.AbstractEventLoop]] = []

    async def model_stream_infer(requests: Requests, context: Any) -> Responses:
        async for request in requests:
            seen.append((request.id, transport.REQUEST_BYTES.get(), hits.drains, asyncio.get_running_loop()))
            for part in range(100):  # a decoupled model's many responses
                yield response(f"{request.id}.{part}")

    sent = requests_of(3 * STREAM_WINDOW)
    async with serving(model_stream_infer, hits) as served:
        received = [r.infer_response.id async for r in served.stub.ModelStreamInfer(iter(sent))]
    assert received == [f"{request.id}.{part}" for request in sent for part in range(100)]
    # Each request's size for the metrics, as grpc.aio records it; the hits so far drained before the handler.
    loop = asyncio.get_running_loop()
    assert seen == [(request.id, request.ByteSize(), 1, loop) for request in sent]


async def test_an_error_ends_the_stream_with_its_status_and_node_after_the_responses_before_it() -> None:
    async def model_stream_infer(requests: Requests, context: Any) -> Responses:
        async for request in requests:
            yield response(request.id)
            error = ModelNotFound("model 'gone' is not registered")
            error.node = "n7"
            raise error

    async with serving(model_stream_infer) as served:
        call = served.stub.ModelStreamInfer(iter([pb.ModelInferRequest(model_name="m", id="first")]))
        first = await call.read()
        failed = await rpc_error(call.read())
    assert isinstance(first, pb.ModelStreamInferResponse) and first.infer_response.id == "first"
    assert failed.code() == grpc.StatusCode.NOT_FOUND and failed.details() == "model 'gone' is not registered"
    assert (NODE_KEY, "n7") in tuple(failed.trailing_metadata() or ())


async def test_a_bug_ends_the_stream_as_internal() -> None:
    async def model_stream_infer(requests: Requests, context: Any) -> Responses:
        async for _ in requests:
            raise ValueError("a bug")
        yield response("unreachable")

    async with serving(model_stream_infer) as served:
        call = served.stub.ModelStreamInfer(iter([pb.ModelInferRequest(model_name="m")]))
        bug = await rpc_error(call.read())
    assert bug.code() == grpc.StatusCode.INTERNAL and bug.details() == "internal error: ValueError: a bug"


async def test_a_request_that_does_not_parse_is_grpcios_internal_error() -> None:
    taken: list[str] = []

    async def model_stream_infer(requests: Requests, context: Any) -> Responses:
        async for request in requests:
            taken.append(request.id)
            yield response(request.id)

    async with serving(model_stream_infer) as served:
        call: Any = served.channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")()
        await call.write(b"\xff\xff\xff")
        broken = await rpc_error(call.read())
    assert (broken.code(), broken.details()) == (grpc.StatusCode.INTERNAL, "Exception deserializing request!")
    assert taken == []


@dataclass
class Streaming:
    """A handler answering each request, then waiting (`busy`) or reading the next; its end is seen, and whether
    its task was cancelled."""

    busy: bool
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False

    async def model_stream_infer(self, requests: Requests, context: Any) -> Responses:
        try:
            async for request in requests:
                yield response(request.id)
                self.answered.set()
                if self.busy:
                    await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.ended.set()


@pytest.mark.parametrize("busy", [False, True], ids=["waiting for a request", "busy on the loop"])
async def test_a_stream_the_client_cancels_cancels_its_task(busy: bool) -> None:
    streaming = Streaming(busy)
    async with serving(streaming.model_stream_infer) as served:
        call = served.stub.ModelStreamInfer()
        await call.write(pb.ModelInferRequest(model_name="m", id="first"))
        first = await call.read()
        assert isinstance(first, pb.ModelStreamInferResponse) and first.infer_response.id == "first"
        await asyncio.wait_for(streaming.answered.wait(), WAIT_S)
        call.cancel()
        await asyncio.wait_for(streaming.ended.wait(), WAIT_S)
    # A handler waiting for a request may first learn the end of them: the core reads a cancelled stream's end as
    # its last request's. One busy on the loop has its task cancelled.
    assert streaming.cancelled or not busy


async def test_a_refused_stream_never_starts_its_task() -> None:
    streaming, hits = Streaming(busy=False), Hits()
    access = Access(members=False, credentials=Credentials(((TOKEN, Role.READER),)), require_for_infer=True)
    async with serving(streaming.model_stream_infer, hits, access) as served:
        # No request written: a write racing the server's refusal fails in the client as INTERNAL.
        refused = await rpc_error(served.stub.ModelStreamInfer(iter(())).read())
        assert hits.drains == 0  # its task would have drained first
        call = served.stub.ModelStreamInfer(iter([pb.ModelInferRequest(model_name="m", id="reader")]),
                                            metadata=(("authorization", "Bearer " + TOKEN.decode()),))
        served_ids = [r.infer_response.id async for r in call]
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert served_ids == ["reader"] and hits.drains == 1


async def test_requests_are_read_at_most_a_window_ahead_of_a_slow_handler() -> None:
    release = asyncio.Event()
    taken: list[str] = []

    async def model_stream_infer(requests: Requests, context: Any) -> Responses:
        async for request in requests:
            taken.append(request.id)
            await release.wait()
            yield response(request.id)

    sent = requests_of(3 * STREAM_WINDOW)
    async with serving(model_stream_infer) as served:
        call = served.stub.ModelStreamInfer()
        counted = await asyncio.wait_for(served.opened.get(), WAIT_S)
        for request in sent:
            await call.write(request)
        await call.done_writing()

        # The handler holds the first; the pollers read the window's worth beyond it, and no more.
        await counted.requests.wait_len(STREAM_WINDOW + 1)
        assert (await served.stub.ModelInfer(pb.ModelInferRequest())).id == "unary"  # the pollers came round
        assert (len(counted.requests), taken) == (STREAM_WINDOW + 1, [sent[0].id])
        release.set()
        received = [r.infer_response.id async for r in call]
    assert received == taken == [request.id for request in sent]
    assert len(counted.requests) == len(sent)

