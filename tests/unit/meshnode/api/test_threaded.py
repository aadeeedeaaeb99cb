"""ThreadedServices on a real grpcio threaded server: calls admitted on its workers, coroutine handlers run on the
test's loop, statuses and cancellation carried across (ModelInfer is api.direct's: test_direct.py; ModelStreamInfer
api.direct_stream's: test_direct_stream.py).

The server listens on 127.0.0.1 (port 0) and the test calls it through a grpc.aio channel on the same loop the
handlers run on; the handlers are the test's own coroutines.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from meshnode.api.access import Access, Credentials, Role
from meshnode.api.status import maps_errors
from meshnode.api.threaded import ThreadedServices
from meshnode.errors import ModelNotFound
from meshnode.net import transport
from meshnode.serving.threaded_hits import ThreadedHits
from meshpb import pb
from router.errors import NODE_KEY
from tests.unit.meshnode.fakes import WAIT_S, rpc_error

pytestmark = pytest.mark.timeout(30)

TOKEN = b"reader-token"


@asynccontextmanager
async def serving(handlers: Mapping[str, Callable[..., Any]], access: Access | None = None,
                  hits: ThreadedHits | None = None) -> AsyncIterator[transport.InferenceStub]:
    """`handlers` (grpc.aio-style) served on Triton's service path by a threaded server; a stub calling it."""
    server = transport.create_threaded_server(4)
    services = ThreadedServices(loop=asyncio.get_running_loop(), access=access or Access(members=True), hits=hits)
    transport.add_inference_service(server, services.handlers(handlers))
    port = transport.bind(server, "127.0.0.1", 0)
    server.start()
    channel = transport.create_channel(f"127.0.0.1:{port}")
    try:
        yield transport.InferenceStub(channel)
    finally:
        await channel.close()
        # Its workers may wait for the loop: it must keep running while the server stops.
        stopped = server.stop(None)
        assert await asyncio.to_thread(stopped.wait, WAIT_S)


# -- unary calls -----------------------------------------------------------------------------------


async def test_a_unary_handler_on_the_loop_answers_the_call() -> None:
    loop = asyncio.get_running_loop()
    ran_on: list[asyncio.AbstractEventLoop] = []

    async def server_metadata(request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        ran_on.append(asyncio.get_running_loop())
        return pb.ServerMetadataResponse(name="meshserve", version="9.9")

    async with serving({"ServerMetadata": server_metadata}) as stub:
        response = await stub.ServerMetadata(pb.ServerMetadataRequest())
    assert (response.name, response.version) == ("meshserve", "9.9") and ran_on == [loop]


class Failing:
    """Handlers that fail: a MeshError through maps_errors, and a bug."""

    @maps_errors
    async def model_ready(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        error = ModelNotFound(f"model '{request.name}' is not registered")
        error.node = "n7"
        raise error

    async def model_metadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        raise ValueError("a bug")


async def test_errors_arrive_with_their_status_message_and_node_and_a_bug_as_internal() -> None:
    failing = Failing()
    async with serving({"ModelReady": failing.model_ready, "ModelMetadata": failing.model_metadata}) as stub:
        mapped = await rpc_error(stub.ModelReady(pb.ModelReadyRequest(name="gone")))
        bug = await rpc_error(stub.ModelMetadata(pb.ModelMetadataRequest(name="m")))
    assert mapped.code() == grpc.StatusCode.NOT_FOUND
    assert mapped.details() == "model 'gone' is not registered"
    assert (NODE_KEY, "n7") in tuple(mapped.trailing_metadata() or ())
    assert bug.code() == grpc.StatusCode.INTERNAL and bug.details() == "internal error: ValueError: a bug"


async def test_a_refused_caller_never_reaches_the_handler() -> None:
    ran: list[str] = []

    async def repository_index(request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        ran.append(request.repository_name)
        return pb.RepositoryIndexResponse()

    access = Access(members=False, credentials=Credentials(((TOKEN, Role.READER),)))
    async with serving({"RepositoryIndex": repository_index}, access) as stub:
        refused = await rpc_error(stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="anonymous")))
        await stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="reader"),
                                   metadata=(("authorization", "Bearer " + TOKEN.decode()),))
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED and "reader role" in (refused.details() or "")
    assert ran == ["reader"]


async def test_time_remaining_is_none_without_a_deadline_and_the_time_left_with_one() -> None:
    seen: list[float | None] = []

    async def server_live(request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        seen.append(context.time_remaining())
        return pb.ServerLiveResponse(live=True)

    async with serving({"ServerLive": server_live}) as stub:
        await stub.ServerLive(pb.ServerLiveRequest())
        await stub.ServerLive(pb.ServerLiveRequest(), timeout=20.0)
    without, within = seen
    assert without is None
    # gRPC's own deadline on the server, which may be a little past the client's (20.1 s seen for 20 s)
    assert within is not None and 15.0 < within <= 21.0


@dataclass
class Waiting:
    """A handler that waits until cancelled."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self) -> None:
        self.started.set()
        try:
            await self.released.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    def release(self) -> None:
        """End the wait without a cancel (so that a test that failed leaves no worker waiting)."""
        self.released.set()

    async def server_live(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        await self.wait()
        return pb.ServerLiveResponse(live=True)

    async def model_infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        await self.wait()
        return pb.ModelInferResponse(model_name=request.model_name)


async def test_a_call_the_client_cancels_cancels_its_handlers_task_on_the_loop() -> None:
    waiting = Waiting()
    async with serving({"ServerLive": waiting.server_live}) as stub:
        call = stub.ServerLive(pb.ServerLiveRequest())
        await asyncio.wait_for(waiting.started.wait(), WAIT_S)
        call.cancel()
        await asyncio.wait_for(waiting.cancelled.wait(), WAIT_S)


async def test_a_call_whose_deadline_passes_cancels_its_handlers_task_on_the_loop() -> None:
    waiting = Waiting()
    async with serving({"ServerLive": waiting.server_live}) as stub:
        late = await rpc_error(stub.ServerLive(pb.ServerLiveRequest(), timeout=0.3))
        await asyncio.wait_for(waiting.cancelled.wait(), WAIT_S)
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED and waiting.started.is_set()


def test_the_direct_lanes_methods_are_left_out() -> None:
    async def handler(request: Any, context: Any) -> Any:
        raise AssertionError("not called")

    services = ThreadedServices(loop=asyncio.new_event_loop(), access=Access(members=True))
    served = services.handlers({"ModelInfer": handler, "ModelStreamInfer": handler, "ServerLive": handler})
    assert set(served) == {"ServerLive"}  # api.direct's and api.direct_stream's
