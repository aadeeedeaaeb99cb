"""One client's ModelStreamInfer through the mesh: each request routed as a unary one is, then sent on a stream.

The session holds at most one stream per place that serves its requests: per copy here whose runtime streams
(Triton: the call passes through, so a decoupled model's many responses, its final-response flags and its errors
come back as Triton sends them), and per peer (one forwarded ModelStreamInfer call, never a unary call per
message). A copy here that does not stream (ONNX Runtime) answers each request once, with Triton's
final-response flag when the request asks for `triton_enable_empty_final_response`.

Every response goes through one bounded queue to the client: while it is full, no stream is read, and gRPC's
flow control holds each runtime and peer, so a slow client slows the work rather than filling memory. Requests of
one stream and one copy are sent in the order they came, so a sequence's requests run in order.

A client that goes away cancels every stream the session opened (the peer's session then cancels its own), and
the runtime's work ends with them.

Each request is observed once (`Observe`), when its outcome is known here: when it was answered, for a copy here
that does not stream; when it was handed to the stream that answers it (the runtime's or a peer's) otherwise, since
a decoupled model's request has no one answer to time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import grpc

from meshnode.errors import ModelUnavailable
from meshnode.runtimes.base import CallerMetadata, InferStream, ResponseSink, StreamingModel
from meshnode.serving.cache import ModelCache
from meshnode.serving.entries import CachedModel
from meshnode.serving.replica import LocalReplica
from meshpb import pb
from placement.types import NodeView
from router.errors import PeerError
from router.hop import Hop

BUFFERED_RESPONSES = 64  # between the streams and the client; also the bound on a stream's requests running here
EMPTY_FINAL_KEY = "triton_enable_empty_final_response"
FINAL_KEY = "triton_final_response"

ErrorResponse = Callable[[pb.ModelInferRequest, BaseException], pb.ModelStreamInferResponse]
Route = Callable[[pb.ModelInferRequest, "StreamSession"], Awaitable[object]]
Observe = Callable[[pb.ModelInferRequest, float, BaseException | None], None]  # request, its arrival, its error


class PeerStream(InferStream, Protocol):
    async def send_hop(self, request: pb.ModelInferRequest, hop: Hop) -> None: ...


class StreamPeers(Protocol):
    def open_stream(self, node: NodeView, sink: ResponseSink,
                    propagated: tuple[tuple[str, str], ...] = ()) -> PeerStream: ...


def final_response(request: pb.ModelInferRequest, response: pb.ModelInferResponse) -> pb.ModelStreamInferResponse:
    """A non-decoupled model's one response on a stream, flagged final when the request asks for the flag."""
    wanted = request.parameters.get(EMPTY_FINAL_KEY)
    if wanted is not None and wanted.bool_param:
        response.parameters[FINAL_KEY].bool_param = True
    return pb.ModelStreamInferResponse(infer_response=response)


class StreamSession:
    """router.ports.Serve for the requests of one client stream."""

    def __init__(self, *, replica: LocalReplica, cache: ModelCache, peers: StreamPeers, error: ErrorResponse,
                 observe: Observe, metadata: CallerMetadata | None,
                 time_remaining: Callable[[], float | None] | None) -> None:
        self._replica = replica
        self._cache = cache
        self._peers = peers
        self._error = error
        self._observe = observe
        self._metadata = metadata
        self._time_remaining = time_remaining
        self._out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue(BUFFERED_RESPONSES)
        self._held: dict[tuple[str, str], tuple[CachedModel, InferStream]] = {}  # copies here that stream
        self._released = False
        self._forwards: dict[str, PeerStream] = {}
        self._runs: set[asyncio.Task[None]] = set()
        # Set by `here` when the request it was given runs here and so is observed when answered.
        self._observed_by_run = False

    async def responses(self, requests: AsyncIterator[pb.ModelInferRequest], route: Route,
                        ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Every response of every request, as produced, until the client's last request is answered."""
        feeding = asyncio.create_task(self._feed(requests, route))
        try:
            while (response := await self._out.get()) is not None:
                yield response
            await feeding  # the client's own stream's failure, if any, ends the call with it
        finally:
            feeding.cancel()
            self._cancel()

    async def _feed(self, requests: AsyncIterator[pb.ModelInferRequest], route: Route) -> None:
        try:
            async for request in requests:
                arrived = time.perf_counter()
                self._observed_by_run = False
                try:
                    await route(request, self)
                except Exception as error:  # Triton's stream semantics: an error answers that request only
                    self._observe(request, arrived, error)
                    await self._put(self._error(request, error))
                else:
                    if not self._observed_by_run:
                        self._observe(request, arrived, None)
            if self._runs:
                await asyncio.wait(self._runs)
            for stream in self._streams():
                await stream.finish()
        except Exception:
            await self._out.put(None)  # the client still reads: it ends with the error (cancelled, it reads no more)
            raise
        finally:
            self._release()
        await self._out.put(None)

    async def _put(self, response: pb.ModelStreamInferResponse) -> None:
        await self._out.put(response)

    async def here(self, request: pb.ModelInferRequest, churn_guard: bool) -> None:
        key = (request.model_name, request.model_version)
        held = self._held.get(key)
        if held is not None and held[1].open:  # the session holds the copy already: no acquire per request
            self._replica.sequences.admit(held[0], request)  # here, so that the router hears SequenceNotHere
            await self._send(held[0], held[1], request)
            return
        started = time.perf_counter()
        entry = await self._replica.acquire(request.model_name, request.model_version, churn_guard)
        try:
            self._replica.sequences.admit(entry, request)
        except BaseException:
            self._cache.release(entry)
            raise
        model = entry.model
        if not isinstance(model, StreamingModel):
            if len(self._runs) >= BUFFERED_RESPONSES:
                await asyncio.wait(self._runs, return_when=asyncio.FIRST_COMPLETED)
            run = asyncio.create_task(self._run(entry, request, started))
            self._observed_by_run = True
            self._runs.add(run)
            run.add_done_callback(self._runs.discard)
            return
        if held is not None:  # its stream ended (the runtime went away): a new one, on the copy acquired now
            self._cache.release(held[0])
        stream = model.open_stream(self._put, self._metadata)
        self._held[key] = (entry, stream)  # held until the session ends: never evicted under its requests
        await self._send(entry, stream, request)

    @staticmethod
    async def _send(entry: CachedModel, stream: InferStream, request: pb.ModelInferRequest) -> None:
        try:
            await stream.send(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            raise ModelUnavailable(f"model '{entry.name}': the runtime's stream ended") from None

    async def _run(self, entry: CachedModel, request: pb.ModelInferRequest, started: float) -> None:
        remaining = self._time_remaining() if self._time_remaining is not None else None
        try:
            response = await self._replica.run(entry, request, started, remaining, self._metadata, admitted=True)
        except Exception as error:
            self._observe(request, started, error)
            await self._put(self._error(request, error))
        else:
            self._observe(request, started, None)
            await self._put(final_response(request, response))

    async def at(self, node: NodeView, request: pb.ModelInferRequest, hop: Hop, budget_s: float | None) -> None:
        stream = self._forwards.get(node.instance_id)
        if stream is None or not stream.open:
            stream = self._peers.open_stream(node, self._put, hop.propagated)
            self._forwards[node.instance_id] = stream
        try:
            await stream.send_hop(request, hop)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # Nothing of it was sent: another copy may serve it.
            raise PeerError(grpc.StatusCode.UNAVAILABLE, f"the stream to node {node.instance_id} ended",
                            retry_elsewhere=True, node=node.instance_id) from None

    def _streams(self) -> list[InferStream]:
        return [*(stream for _, stream in self._held.values()), *self._forwards.values()]

    def _cancel(self) -> None:
        for run in self._runs:
            run.cancel()
        for stream in self._streams():
            stream.cancel()
        self._release()

    def _release(self) -> None:
        """The copies here the session held: free to be evicted again."""
        if not self._released:
            self._released = True
            for entry, _ in self._held.values():
                self._cache.release(entry)
