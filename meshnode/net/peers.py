"""Forwarding to peer nodes over gRPC from the event loop: one channel per peer; the calls outstanding and
the suspects are counted in net.peer_load, shared with the threaded server's forwards (net.threaded_peers).

Peers prove they are mesh members, so that the hop they send is honoured: by their certificate over
mutual TLS (`tls`), or else by a MeshProof on each call (`proof`, with the mesh secret).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import grpc
from google.protobuf.message import Message

from meshnode.background import BackgroundTasks
from meshnode.net import params, transport
from meshnode.net.peer_load import PeerLoad
from meshnode.net.proof import MeshProof
from meshnode.net.tls import ClientTls
from meshpb import pb
from placement.types import NodeView
from router.errors import NOT_HERE_PREFIX, OVERLOADED_PREFIX, RETRY_ELSEWHERE_CODES, Overloaded, PeerError
from router.hop import PARAMETER_KEY, Hop, Mode

# A traced call: (method, endpoint) -> a span around the call, yielding the trace context to send with it
# (meshnode.observability.tracing.Tracing.client).
ClientSpan = Callable[[str, str], AbstractContextManager[tuple[tuple[str, str], ...]]]


def peer_error(peer: str, error: grpc.aio.AioRpcError | grpc.Call, *,
               retry_elsewhere: bool | None = None) -> PeerError | Overloaded:
    """A peer's failed call as the router sees it: the peer's status and message as the peer worded them (the
    peer is the error's `node`, never a prefix), and whether another node may succeed (by the status, unless
    the caller knows better).

    A peer's copy at its bound answers RESOURCE_EXHAUSTED as a node without room does; its message's
    prefix tells them apart, and it comes back as Overloaded, which the router counts per model.
    """
    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(OVERLOADED_PREFIX):
        overloaded = Overloaded(details)
        overloaded.node = peer
        return overloaded
    return PeerError(code, details, node=peer,
                     retry_elsewhere=code in RETRY_ELSEWHERE_CODES if retry_elsewhere is None else retry_elsewhere)


def forward_failed(load: PeerLoad, peer: str, error: grpc.aio.AioRpcError | grpc.Call) -> PeerError | Overloaded:
    """A forwarded request's failed call (from the loop or a polling thread): the peer is a suspect when it did not
    answer (UNAVAILABLE, but for a node saying the copy is not there), and the error is as the router sees it."""
    if error.code() == grpc.StatusCode.UNAVAILABLE and not (error.details() or "").startswith(NOT_HERE_PREFIX):
        load.suspect(peer)
    return peer_error(peer, error)


class PeerStream(transport.CallStream):
    """A stream to a peer: each request carries the hop it was routed with (in its parameters, as a unary
    forward's does); `ended` runs once, when the call is over."""

    def __init__(self, call: Any, sink: transport.ResponseSink,
                 failed: Callable[[grpc.aio.AioRpcError], pb.ModelStreamInferResponse],
                 ended: Callable[[], None]) -> None:
        super().__init__(call, sink, failed)
        self._pump.add_done_callback(lambda _: ended())

    async def send_hop(self, request: pb.ModelInferRequest, hop: Hop) -> None:
        request.parameters[PARAMETER_KEY].string_param = hop.encode()
        await self.send(request)


class GrpcPeers:
    def __init__(self, load: PeerLoad, tls: ClientTls | None = None, proof: MeshProof | None = None,
                 client_span: ClientSpan | None = None) -> None:
        self._load = load
        self._tls = tls
        self._client_span = client_span  # None: tracing is off
        self._proof = proof
        self._stubs: dict[str, tuple[str, grpc.aio.Channel, transport.InferenceStub]] = {}
        self._gone: set[str] = set()  # left the mesh; channel closes when its last call ends
        self._closing = BackgroundTasks()

    def outstanding(self) -> Mapping[str, int]:
        return self._load.outstanding()

    def suspects(self) -> frozenset[str]:
        return self._load.suspects()

    def _stub(self, node: NodeView) -> transport.InferenceStub:
        self._gone.discard(node.instance_id)  # back in the mesh (a restart under the same id)
        found = self._stubs.get(node.instance_id)
        if found is None or found[0] != node.endpoint:  # new, or restarted elsewhere under its id
            if found is not None:
                self._closing.spawn(found[1].close())
            channel = transport.create_channel(node.endpoint, self._tls, options=transport.PEER_OPTIONS)
            found = (node.endpoint, channel, transport.InferenceStub(channel))
            self._stubs[node.instance_id] = found
        return found[2]

    async def infer(self, node: NodeView, request: pb.ModelInferRequest, hop: Hop,
                    budget_s: float | None) -> pb.ModelInferResponse:
        peer = node.instance_id
        self._load.started(peer)
        try:
            request.parameters[PARAMETER_KEY].string_param = hop.encode()
            # Only trace context (when the client sent some, or ours when tracing) and the proof go as metadata.
            if self._client_span is None:
                return await self._stub(node).ModelInfer(request, timeout=budget_s,
                                                         metadata=self._metadata("ModelInfer", hop.propagated))
            with self._client_span("ModelInfer", node.endpoint) as trace:
                return await self._stub(node).ModelInfer(request, timeout=budget_s,
                                                         metadata=self._metadata("ModelInfer", trace))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our own caller went away: let the cancellation through
            # The call was cancelled under us (its channel closed as the peer left): another node may
            # serve it. Left as CancelledError, grpc.aio would drop our own client's call unanswered.
            raise PeerError(grpc.StatusCode.UNAVAILABLE, f"node {peer} left while serving the request",
                            retry_elsewhere=True) from None
        except grpc.aio.AioRpcError as error:
            raise forward_failed(self._load, peer, error) from None
        finally:
            self._ended(peer)

    def open_stream(self, node: NodeView, sink: transport.ResponseSink,
                    propagated: tuple[tuple[str, str], ...] = ()) -> PeerStream:
        """One ModelStreamInfer call to `node`, for the requests of a client's stream that its copies serve: the
        peer's responses (many per request from a decoupled model) reach `sink` as the peer sends them. Counted
        as outstanding while open; a call that breaks makes the peer a suspect, as a unary call does."""
        peer = node.instance_id
        call = self._stub(node).ModelStreamInfer(metadata=self._metadata("ModelStreamInfer", propagated))
        self._load.started(peer)

        def failed(error: grpc.aio.AioRpcError) -> pb.ModelStreamInferResponse:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                self._load.suspect(peer)
            return pb.ModelStreamInferResponse(error_message=error.details() or f"node {peer} ended the stream")

        return PeerStream(call, sink, failed, ended=lambda: self._ended(peer))

    def _ended(self, peer: str) -> None:
        if not self._load.ended(peer):
            self._close_if_gone(peer)

    async def load_copy(self, node: NodeView, name: str, budget_s: float) -> None:
        """Ask `node` to load a copy of registered model `name`; raises PeerError (or Overloaded)."""
        request = pb.RepositoryModelLoadRequest(
            model_name=name, parameters={params.COPY: pb.ModelRepositoryParameter(bool_param=True)})
        try:
            await self._stub(node).RepositoryModelLoad(request, timeout=budget_s,
                                                       metadata=self._metadata("RepositoryModelLoad"))
        except grpc.aio.AioRpcError as error:
            raise peer_error(node.instance_id, error) from None

    async def metadata(self, node: NodeView, name: str, version: str,
                       budget_s: float = 5.0) -> pb.ModelMetadataResponse:
        """The model's metadata from the copy on `node` (marked as forwarded: it never loads there)."""
        hop = Hop(hops=1, mode=Mode.COPY)
        try:
            return await self._stub(node).ModelMetadata(
                pb.ModelMetadataRequest(name=name, version=version), timeout=budget_s,
                metadata=self._metadata("ModelMetadata", hop.to_metadata()))
        except grpc.aio.AioRpcError as error:
            # Any copy answers metadata as well as another: whatever this one said, ask the next.
            raise peer_error(node.instance_id, error, retry_elsewhere=True) from None

    async def ask(self, node: NodeView, method: str, request: Message, entries: tuple[tuple[str, str], ...] = (),
                  budget_s: float = 5.0) -> Any:
        """One unary call of the inference service's `method` (ModelConfig, ModelStatistics) on `node`; a failure
        is a PeerError: another node may answer as well."""
        try:
            return await getattr(self._stub(node), method)(request, timeout=budget_s,
                                                           metadata=self._metadata(method, entries))
        except grpc.aio.AioRpcError as error:
            raise peer_error(node.instance_id, error, retry_elsewhere=True) from None

    async def ready(self, node: NodeView, budget_s: float = 2.0) -> bool:
        """Does the peer answer a readiness probe now? (before this node lets go of a copy)"""
        try:
            reply = await self._stub(node).ServerReady(pb.ServerReadyRequest(), timeout=budget_s,
                                                       metadata=self._metadata("ServerReady"))
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.ready)

    def _metadata(self, method: str, entries: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...] | None:
        if self._proof is not None:
            entries = (*entries, self._proof.sign(method))
        return entries or None

    def forget(self, instance_id: str) -> None:
        """The peer left the mesh: close its channel once the calls still out on it have ended."""
        self._load.clear(instance_id)
        self._gone.add(instance_id)
        self._close_if_gone(instance_id)

    def _close_if_gone(self, instance_id: str) -> None:
        if instance_id not in self._gone or self._load.outstanding().get(instance_id):
            return
        self._gone.discard(instance_id)
        found = self._stubs.pop(instance_id, None)
        if found is not None:
            self._closing.spawn(found[1].close())

    async def close(self) -> None:
        for _, channel, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()
        await self._closing.wait()
