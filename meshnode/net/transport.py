"""The one place that creates gRPC servers and channels.

TLS/mTLS, interceptors (tracing) and message-size limits plug in here and nowhere else. A server is either
grpc.aio's (handlers are coroutines on the event loop) or grpcio's threaded one (handlers are functions run on
its worker threads: --grpc-server threaded, see meshnode.api.threaded, with ModelInfer and ModelStreamInfer served
off its C core: net.direct_calls); both take the same handler registration, binding and reflection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, Protocol, cast

import grpc
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc.aio import StreamStreamMultiCallable, UnaryUnaryMultiCallable
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2 as triton_pb

from meshnode.net.direct_calls import DirectCalls, StreamHandle
from meshnode.net.direct_calls import Handler as DirectHandler
from meshnode.net.tls import ClientTls, ServerTls, channel_credentials, server_credentials
from meshpb import INFERENCE_METHODS, INFERENCE_SERVICE, MANAGEMENT_METHODS, MANAGEMENT_SERVICE, Methods, mpb, pb

# Triton's methods that meshserve's own messages leave out (ModelConfig, ModelStatistics, shared memory, trace and
# log settings) are served with tritonclient's messages, which are Triton's: the same service path, and
# reflection describes the service from that same descriptor.
_TRITON_SERVICE = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
TRITON_ONLY_METHODS: Methods = {
    m.name: (GetMessageClass(m.input_type), GetMessageClass(m.output_type), m.client_streaming, m.server_streaming)
    for m in _TRITON_SERVICE.methods if m.name not in INFERENCE_METHODS
}
SERVED_INFERENCE_METHODS: Methods = {**INFERENCE_METHODS, **TRITON_ONLY_METHODS}

# Tensors are large and Triton sets no practical limit; 2 GiB is protobuf's own ceiling.
MAX_MESSAGE_BYTES = 2**31 - 1
_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # gRPC's reconnect backoff grows to 120 s: a restarted peer or Triton sidecar would be refused for
    # that long after it is back. Reconnecting within a second costs a few connects to a dead address.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Peers ping each other during calls (PEER_OPTIONS): accept a ping a second and never answer one with
    # GOAWAY, which the defaults (one per 5 minutes, 2 strikes) would.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]
# Channels to peers: a peer cut off the network (a dead link, a paused VM) answers nothing, and a call to it
# would wait for its whole deadline. Pinging during calls fails them UNAVAILABLE within about 4 s instead, and
# the router tries another copy. Not for Triton's or etcd's channels: their servers refuse pings this often.
PEER_OPTIONS: Mapping[str, Any] = {"grpc.keepalive_time_ms": 2000, "grpc.keepalive_timeout_ms": 2000,
                                   "grpc.keepalive_permit_without_calls": 0, "grpc.http2.max_pings_without_data": 0}


# method -> (request class, response class, client streams, server streams), as meshpb.Methods with the classes
# typed as what they are: meshpb's message classes.
_MessageMethods = Mapping[str, tuple[type[Message], type[Message], bool, bool]]


def _message_methods(methods: Methods) -> _MessageMethods:
    # meshpb.Methods types its classes as plain `type`; they come from GetMessageClass.
    return cast(_MessageMethods, methods)


# Either kind of server: they share the registration and binding API.
Server = grpc.aio.Server | grpc.Server


class _RegistersMethodHandlers(Protocol):
    # Both servers have this method at run time (grpcio 1.81), but types-grpcio 1.82 does not declare it.
    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None: ...


def add_registered_method_handlers(server: Server, service: str,
                                   method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
    """`server.add_registered_method_handlers(service, method_handlers)`, typed."""
    cast(_RegistersMethodHandlers, server).add_registered_method_handlers(service, method_handlers)


def create_server(interceptors: list[Any] | None = None) -> grpc.aio.Server:
    return grpc.aio.server(options=_OPTIONS, interceptors=interceptors or None)


def create_threaded_server(threads: int) -> grpc.Server:
    """grpcio's threaded server: its C core polls and hands each call to one of `threads` worker threads, which
    costs a bare unary call 15-20% less CPU than grpc.aio's task per call (bench.hot_path's two floors)."""
    return grpc.server(ThreadPoolExecutor(threads, thread_name_prefix="grpc"), options=_OPTIONS)


def serve_directly(server: grpc.Server, method: str, handle: DirectHandler, max_pollers: int,
                   streams: Mapping[str, StreamHandle] | None = None) -> DirectCalls:
    """The inference service's unary `method` of a threaded server, off its C core by `handle` on up to
    `max_pollers` threads (net.direct_calls), and its stream methods in `streams` (method: the handler of its new
    calls) by the same threads; before the server starts, and never also in its handlers."""
    return DirectCalls(server, f"/{INFERENCE_SERVICE}/{method}", handle, max_pollers,
                       {f"/{INFERENCE_SERVICE}/{name}": opened for name, opened in (streams or {}).items()})


async def start(server: Server) -> None:
    if isinstance(server, grpc.aio.Server):
        await server.start()
    else:
        server.start()


async def stop(server: Server, grace_s: float) -> None:
    """Stop taking calls and wait up to `grace_s` for those running; a threaded server's calls may need the
    event loop to finish, so its end is awaited off the loop."""
    if isinstance(server, grpc.aio.Server):
        await server.stop(grace_s)
    else:
        await asyncio.to_thread(server.stop(grace_s).wait)


def bind(server: Server, host: str, port: int, tls: ServerTls | None = None) -> int:
    """Bind in plaintext, or with TLS (re-read when its files change); returns the bound port (for port 0)."""
    address = f"{host}:{port}"
    bound = server.add_insecure_port(address) if tls is None else server.add_secure_port(
        address, server_credentials(tls))
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    return bound


# The sizes of a call's messages as they cross the wire, for the metrics: known here for free, where a message
# is parsed and written, while Message.ByteSize() would encode it once more (2.7 ms for a 1 MB tensor). Set in
# the task that runs the handler: grpc.aio parses, calls the handler and writes the reply in that one task.
REQUEST_BYTES: ContextVar[int] = ContextVar("meshserve_request_bytes", default=0)
RESPONSE_BYTES_TO: ContextVar[Callable[[int], None] | None] = ContextVar("meshserve_response_bytes_to",
                                                                         default=None)


def _parsed(cls: type[Message]) -> Callable[[bytes], Message]:
    parse = cls.FromString

    def parsed(data: bytes) -> Message:
        REQUEST_BYTES.set(len(data))
        return parse(data)

    return parsed


def _written(cls: type[Message]) -> Callable[[Message | bytes], bytes]:
    write = cls.SerializeToString

    def written(message: Message | bytes) -> bytes:
        # A handler that wrote the message itself (a threaded local hit, which counts its size) returns bytes.
        if isinstance(message, bytes):
            return message
        data = write(message)
        report = RESPONSE_BYTES_TO.get()
        if report is not None:
            report(len(data))
        return data

    return written


def _parsing(handler: Callable[[Any, Any], Any], parse: Callable[[bytes], Message]) -> Callable[[bytes, Any], Any]:
    def parsing(data: bytes, context: Any) -> Any:
        return handler(parse(data), context)

    return parsing


def _parsing_stream(handler: Callable[[Any, Any], Any],
                    parse: Callable[[bytes], Message]) -> Callable[[Iterator[bytes], Any], Any]:
    def parsing(requests: Iterator[bytes], context: Any) -> Any:
        return handler((parse(data) for data in requests), context)

    return parsing


def add_service(server: Server, service: str, methods: Methods,
                handlers: Mapping[str, Callable[..., Any]]) -> None:
    """Serve `handlers` under the service path `service`: coroutines and async generators on a grpc.aio server,
    functions and generators on a threaded one."""
    method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method, (request_cls, response_cls, client_streams, server_streams) in _message_methods(methods).items():
        handler = handlers.get(method)
        if handler is None:
            continue
        if client_streams and server_streams:
            make = grpc.stream_stream_rpc_method_handler
        elif server_streams:
            make = grpc.unary_stream_rpc_method_handler
        elif client_streams:
            make = grpc.stream_unary_rpc_method_handler
        else:
            make = grpc.unary_unary_rpc_method_handler
        if isinstance(server, grpc.aio.Server):
            method_handlers[method] = make(handler, request_deserializer=_parsed(request_cls),
                                           response_serializer=_written(response_cls))
        else:
            # The threaded server parses on its one polling thread, outside the call's context: parse in the
            # handler instead, on the call's worker, where the size can reach the metrics.
            parse = _parsed(request_cls)
            method_handlers[method] = make(_parsing_stream(handler, parse) if client_streams
                                           else _parsing(handler, parse), response_serializer=_written(response_cls))
    add_registered_method_handlers(server, service, method_handlers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, method_handlers),))


def add_inference_service(server: Server, handlers: Mapping[str, Callable[..., Any]]) -> None:
    """Serve Triton's inference protocol on Triton's own service path."""
    add_service(server, INFERENCE_SERVICE, SERVED_INFERENCE_METHODS, handlers)


def add_management_service(server: Server, handlers: Mapping[str, Callable[..., Any]]) -> None:
    add_service(server, MANAGEMENT_SERVICE, MANAGEMENT_METHODS, handlers)


def add_reflection(server: Server) -> None:
    """gRPC server reflection (what `grpcurl list` and `describe` ask) for every service the node serves."""
    reflection.enable_server_reflection(
        (_TRITON_SERVICE.full_name, MANAGEMENT_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)


Extra = Callable[[], Sequence[tuple[str, str]]]


class _AddsMetadata(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds `extra()`'s entries to every unary call's metadata (the CLI's bearer token). Streams are left out:
    grpc.aio's intercepted streaming calls are slow to end when cancelled, and nothing needs them here."""

    def __init__(self, extra: Extra) -> None:
        self._extra = extra

    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._extra())
        return await continuation(grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                                             details.credentials, details.wait_for_ready), request)


def _channel_options(options: Mapping[str, Any] | None) -> list[tuple[str, Any]]:
    return list({**dict(_OPTIONS), **(options or {})}.items())


def create_channel(target: str, tls: ClientTls | None = None, metadata: Extra | None = None,
                   options: Mapping[str, Any] | None = None) -> grpc.aio.Channel:
    """A channel in plaintext or TLS; `metadata` (called per call) adds entries to every unary call."""
    interceptors = [_AddsMetadata(metadata)] if metadata is not None else None
    opts = _channel_options(options)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)
    return grpc.aio.secure_channel(target, channel_credentials(tls), options=opts, interceptors=interceptors)


def create_threaded_channel(target: str, tls: ClientTls | None = None,
                            options: Mapping[str, Any] | None = None) -> grpc.Channel:
    """A grpcio channel whose calls block the calling thread (the threaded server's polling threads), in
    plaintext or TLS, with the options of `create_channel`'s."""
    opts = _channel_options(options)
    if tls is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, channel_credentials(tls), options=opts)


class Stub:
    """Client of one service: an attribute per method, taking and returning meshserve's messages.

    Subclasses declare the attributes' types, one per method of their service."""

    def __init__(self, channel: grpc.aio.Channel, service: str, methods: Methods) -> None:
        for method, (request_cls, response_cls, client_streams, server_streams) in _message_methods(methods).items():
            make = channel.stream_stream if client_streams and server_streams else channel.unary_unary
            setattr(self, method, make(
                f"/{service}/{method}",
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString,
            ))


class InferenceStub(Stub):
    """Triton's service path with meshserve's messages (CLI, peers, tests, the Triton runtime)."""

    ServerLive: UnaryUnaryMultiCallable[pb.ServerLiveRequest, pb.ServerLiveResponse]
    ServerReady: UnaryUnaryMultiCallable[pb.ServerReadyRequest, pb.ServerReadyResponse]
    ModelReady: UnaryUnaryMultiCallable[pb.ModelReadyRequest, pb.ModelReadyResponse]
    ServerMetadata: UnaryUnaryMultiCallable[pb.ServerMetadataRequest, pb.ServerMetadataResponse]
    ModelMetadata: UnaryUnaryMultiCallable[pb.ModelMetadataRequest, pb.ModelMetadataResponse]
    ModelInfer: UnaryUnaryMultiCallable[pb.ModelInferRequest, pb.ModelInferResponse]
    ModelStreamInfer: StreamStreamMultiCallable[pb.ModelInferRequest, pb.ModelStreamInferResponse]
    RepositoryIndex: UnaryUnaryMultiCallable[pb.RepositoryIndexRequest, pb.RepositoryIndexResponse]
    RepositoryModelLoad: UnaryUnaryMultiCallable[pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse]
    RepositoryModelUnload: UnaryUnaryMultiCallable[pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse]
    # Triton's messages (tritonclient ships no types)
    ModelConfig: UnaryUnaryMultiCallable[Any, Any]
    ModelStatistics: UnaryUnaryMultiCallable[Any, Any]

    def __init__(self, channel: grpc.aio.Channel) -> None:
        super().__init__(channel, INFERENCE_SERVICE, SERVED_INFERENCE_METHODS)


ResponseSink = Callable[[pb.ModelStreamInferResponse], Awaitable[None]]


class CallStream:
    """One ModelStreamInfer call held open: requests written in order, every response handed to `sink` as it
    comes (zero, one or many per request). The sink's waits are the stream's back-pressure: while it waits,
    nothing is read, and gRPC's flow control holds the other end. A call that fails ends with one error response
    (`failed`); a cancelled one ends silently, its caller having gone."""

    def __init__(self, call: grpc.aio.StreamStreamCall[pb.ModelInferRequest, pb.ModelStreamInferResponse],
                 sink: ResponseSink, failed: Callable[[grpc.aio.AioRpcError], pb.ModelStreamInferResponse]) -> None:
        self._call = call
        self._pump = asyncio.create_task(self._read(sink, failed))

    @property
    def open(self) -> bool:
        return not self._pump.done()

    async def _read(self, sink: ResponseSink,
                    failed: Callable[[grpc.aio.AioRpcError], pb.ModelStreamInferResponse]) -> None:
        try:
            async for response in self._call:
                await sink(response)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                await sink(failed(error))

    async def send(self, request: pb.ModelInferRequest) -> None:
        await self._call.write(request)

    async def finish(self) -> None:
        """No more requests: wait for the responses to every request sent."""
        if self.open:
            await self._call.done_writing()
        await self._pump

    def cancel(self) -> None:
        self._call.cancel()
        self._pump.cancel()


class ManagementStub(Stub):
    RegisterModel: UnaryUnaryMultiCallable[mpb.RegisterModelRequest, mpb.ModelStatus]
    UnregisterModel: UnaryUnaryMultiCallable[mpb.UnregisterModelRequest, mpb.UnregisterModelResponse]
    GetModelStatus: UnaryUnaryMultiCallable[mpb.GetModelStatusRequest, mpb.ModelStatus]
    ListModels: UnaryUnaryMultiCallable[mpb.ListModelsRequest, mpb.ListModelsResponse]
    SetAlias: UnaryUnaryMultiCallable[mpb.SetAliasRequest, mpb.Alias]
    GetAlias: UnaryUnaryMultiCallable[mpb.GetAliasRequest, mpb.Alias]
    DeleteAlias: UnaryUnaryMultiCallable[mpb.DeleteAliasRequest, mpb.DeleteAliasResponse]
    ListAliases: UnaryUnaryMultiCallable[mpb.ListAliasesRequest, mpb.ListAliasesResponse]
    ListNodes: UnaryUnaryMultiCallable[mpb.ListNodesRequest, mpb.ListNodesResponse]

    def __init__(self, channel: grpc.aio.Channel) -> None:
        super().__init__(channel, MANAGEMENT_SERVICE, MANAGEMENT_METHODS)
