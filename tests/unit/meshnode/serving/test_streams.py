"""StreamSession over the real replica and cache, with fake streams for a runtime that streams and for peers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshnode.errors import InvalidInput
from meshnode.observability.tracing import status_code
from meshnode.runtimes.base import CallerMetadata, LoadedModel, ResponseSink
from meshnode.serving.streams import BUFFERED_RESPONSES, EMPTY_FINAL_KEY, FINAL_KEY, StreamSession
from meshnode.storage.repository import ModelSource
from meshpb import pb
from placement.types import NodeView
from router.errors import PeerError
from router.hop import PARAMETER_KEY, Hop, Mode
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import FakeLoadedModel, FakeRuntime, NodeParts, node_view

pytestmark = pytest.mark.timeout(10)


@dataclass
class FakeStream:
    """A stream of a runtime or to a peer: records what was sent; `answer` plays the other end."""

    sink: ResponseSink
    sent: list[pb.ModelInferRequest] = field(default_factory=list)
    finished: bool = False
    cancelled: bool = False
    ended: bool = False  # the call is over (the other end went away)
    refuses: bool = False  # a write fails (the call ended as it was written to)
    answered: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # no answer being produced

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def open(self) -> bool:
        return not (self.finished or self.cancelled or self.ended)

    async def send(self, request: pb.ModelInferRequest) -> None:
        if self.refuses:
            raise asyncio.InvalidStateError("the call is over")
        self.sent.append(request)

    async def send_hop(self, request: pb.ModelInferRequest, hop: Hop) -> None:
        request.parameters[PARAMETER_KEY].string_param = hop.encode()
        await self.send(request)

    async def answer(self, request_id: str, count: int) -> None:
        self.idle.clear()
        for i in range(count):
            self.answered += 1
            await self.sink(pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(
                id=request_id, parameters={"i": pb.InferParameter(int64_param=i)})))
        self.idle.set()

    async def finish(self) -> None:
        await self.idle.wait()  # as a call's end waits for the responses still coming
        self.finished = True

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class StreamingModel(FakeLoadedModel):
    streams: list[FakeStream] = field(default_factory=list)

    def open_stream(self, sink: ResponseSink, caller_metadata: CallerMetadata | None = None) -> FakeStream:
        self.streams.append(FakeStream(sink))
        return self.streams[-1]


class StreamingRuntime(FakeRuntime):
    async def load(self, source: ModelSource) -> LoadedModel:
        await super().load(source)
        model = StreamingModel(source.name, source.version, 10)
        self.models[f"{source.name}@{source.version}"] = model
        return model


@dataclass
class FakeStreamPeers:
    opened: list[tuple[str, FakeStream]] = field(default_factory=list)

    def open_stream(self, node: NodeView, sink: ResponseSink,
                    propagated: tuple[tuple[str, str], ...] = ()) -> FakeStream:
        self.opened.append((node.instance_id, FakeStream(sink)))
        return self.opened[-1][1]


def error_response(request: pb.ModelInferRequest, error: BaseException) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(error_message=f"{request.id}: {error}")


def session(node: NodeParts, peers: FakeStreamPeers, observed: list[tuple[str, str]] | None = None) -> StreamSession:
    """`observed`: each request's id and status code, as the session observes them."""
    def observe(request: pb.ModelInferRequest, arrived: float, error: BaseException | None) -> None:
        assert arrived <= time.perf_counter()
        if observed is not None:
            observed.append((request.id, status_code(error).name))

    return StreamSession(replica=node.replica, cache=node.cache, peers=peers, error=error_response, observe=observe,
                         metadata=None, time_remaining=None)


async def requests_of(*requests: pb.ModelInferRequest, until: asyncio.Event | None = None,
                      ) -> AsyncIterator[pb.ModelInferRequest]:
    for request in requests:
        yield request
    if until is not None:
        await until.wait()


async def here(request: pb.ModelInferRequest, serve: StreamSession) -> None:
    await serve.here(request, False)


def ids(responses: Iterable[pb.ModelStreamInferResponse]) -> list[str]:
    return [r.error_message or r.infer_response.id for r in responses]


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeParts]:
    parts = await NodeParts(FakeStore(), tmp_path / "repo", runtime=StreamingRuntime()).start(mesh=False)
    yield parts
    await parts.stop()


@pytest.fixture
async def onnx_node(tmp_path: Path) -> AsyncIterator[NodeParts]:
    parts = await NodeParts(FakeStore(), tmp_path / "repo").start(mesh=False)
    yield parts
    await parts.stop()


async def test_a_copy_that_does_not_stream_answers_each_request_once_flagged_final_when_asked(
    onnx_node: NodeParts,
) -> None:
    await onnx_node.register("m")
    flagged = pb.ModelInferRequest(model_name="m", id="b", parameters={EMPTY_FINAL_KEY: pb.InferParameter(
        bool_param=True)})
    observed: list[tuple[str, str]] = []
    out = [r async for r in session(onnx_node, FakeStreamPeers(), observed).responses(
        requests_of(pb.ModelInferRequest(model_name="m", id="a"), pb.ModelInferRequest(model_name="nope", id="c"),
                    flagged), here)]
    assert sorted(ids(out)) == ["a", "b", "c: Request for unknown model: 'nope' is not found"]
    final = {r.infer_response.id: r.infer_response.parameters[FINAL_KEY].bool_param for r in out if not r.error_message}
    assert final == {"a": False, "b": True}
    assert onnx_node.cache.ready[("m", "")].inflight == 0  # every run released its copy
    assert sorted(observed) == [("a", "OK"), ("b", "OK"), ("c", "NOT_FOUND")]  # each request once, when answered


async def test_an_error_of_one_run_answers_that_request_and_the_stream_goes_on(onnx_node: NodeParts) -> None:
    await onnx_node.register("m")
    await onnx_node.use("m")
    onnx_node.runtime.models["m@1"].errors.append(InvalidInput("bad INPUT0"))
    observed: list[tuple[str, str]] = []
    out = [r async for r in session(onnx_node, FakeStreamPeers(), observed).responses(
        requests_of(pb.ModelInferRequest(model_name="m", id="a")), here)]
    assert ids(out) == ["a: bad INPUT0"]
    assert observed == [("a", "INVALID_ARGUMENT")]


async def test_requests_to_a_copy_that_streams_go_in_order_on_one_stream_holding_the_copy(node: NodeParts) -> None:
    await node.register("m")
    more = asyncio.Event()
    responses = session(node, FakeStreamPeers()).responses(
        requests_of(*(pb.ModelInferRequest(model_name="m", id=str(i)) for i in range(3)), until=more), here)
    reader = asyncio.create_task(first(responses))
    await _until(lambda: len(streams_of(node)) == 1 and len(streams_of(node)[0].sent) == 3)
    stream = streams_of(node)[0]
    assert [r.id for r in stream.sent] == ["0", "1", "2"]
    assert node.cache.ready[("m", "")].inflight == 1  # held once for the session: never evicted under it
    await stream.answer("0", 3)  # a decoupled model's many responses, as produced
    assert (await reader).infer_response.id == "0"
    more.set()
    rest = [r async for r in responses]
    assert [r.infer_response.parameters["i"].int64_param for r in rest] == [1, 2]
    assert stream.finished and node.cache.ready[("m", "")].inflight == 0


async def test_requests_for_a_peers_copy_share_one_forwarded_stream_with_their_hops(node: NodeParts) -> None:
    peers = FakeStreamPeers()
    n2 = node_view("n2")

    async def to_n2(request: pb.ModelInferRequest, serve: StreamSession) -> None:
        await serve.at(n2, request, Hop(hops=1, tried=("me",), mode=Mode.COPY), None)

    observed: list[tuple[str, str]] = []
    out = [r async for r in session(node, peers, observed).responses(
        requests_of(pb.ModelInferRequest(model_name="m", id="a"), pb.ModelInferRequest(model_name="m", id="b")),
        to_n2)]
    assert out == [] and [peer for peer, _ in peers.opened] == ["n2"]
    assert observed == [("a", "OK"), ("b", "OK")]  # once each, when handed to the peer's stream
    stream = peers.opened[0][1]
    assert [Hop.decode(r.parameters[PARAMETER_KEY].string_param).mode for r in stream.sent] == [Mode.COPY] * 2
    assert stream.finished


async def test_a_stream_that_ended_is_replaced_and_one_that_refuses_a_request_sends_it_elsewhere(
    node: NodeParts,
) -> None:
    peers, n2 = FakeStreamPeers(), node_view("n2")
    serve = session(node, peers)
    await serve.at(n2, pb.ModelInferRequest(model_name="m"), Hop(), None)
    peers.opened[0][1].ended = True
    await serve.at(n2, pb.ModelInferRequest(model_name="m"), Hop(), None)
    assert len(peers.opened) == 2 and len(peers.opened[1][1].sent) == 1
    peers.opened[1][1].refuses = True
    with pytest.raises(PeerError) as caught:
        await serve.at(n2, pb.ModelInferRequest(model_name="m"), Hop(), None)
    assert caught.value.retry_elsewhere and caught.value.node == "n2"  # the router tries the next copy


async def test_a_client_that_goes_away_cancels_every_stream_and_frees_the_copy(node: NodeParts) -> None:
    await node.register("m")
    peers, never = FakeStreamPeers(), asyncio.Event()

    async def both(request: pb.ModelInferRequest, serve: StreamSession) -> None:
        await serve.here(request, False)
        await serve.at(node_view("n2"), request, Hop(), None)

    responses = session(node, peers).responses(requests_of(pb.ModelInferRequest(model_name="m"), until=never), both)
    reader = asyncio.create_task(first(responses))
    await _until(lambda: len(peers.opened) == 1)
    reader.cancel()  # as gRPC cancels a handler whose client went away
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert streams_of(node)[0].cancelled and peers.opened[0][1].cancelled
    assert node.cache.ready[("m", "")].inflight == 0


async def test_a_client_that_reads_slowly_holds_the_streams_back(node: NodeParts) -> None:
    await node.register("m")
    more = asyncio.Event()
    responses = session(node, FakeStreamPeers()).responses(
        requests_of(pb.ModelInferRequest(model_name="m", id="a"), until=more), here)
    reader = asyncio.create_task(first(responses))
    await _until(lambda: bool(streams_of(node)))
    stream = streams_of(node)[0]
    producing = asyncio.create_task(stream.answer("a", BUFFERED_RESPONSES + 3))
    assert (await reader).infer_response.id == "a"
    await _until(lambda: stream.answered == BUFFERED_RESPONSES + 2)  # one read, the buffer full, one waiting
    for _ in range(10):
        await asyncio.sleep(0)
    assert not producing.done() and stream.answered == BUFFERED_RESPONSES + 2  # held until the client reads
    more.set()
    rest = [r async for r in responses]
    await producing
    assert len(rest) == BUFFERED_RESPONSES + 2


async def first(responses: AsyncIterator[pb.ModelStreamInferResponse]) -> pb.ModelStreamInferResponse:
    return await anext(responses)


def streams_of(node: NodeParts) -> list[FakeStream]:
    model = node.runtime.models.get("m@1")
    return model.streams if isinstance(model, StreamingModel) else []


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - the fakes' state signals nothing to wait on
            await asyncio.sleep(0)
