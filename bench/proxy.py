"""A bare grpc.aio byte-passthrough proxy: the honest minimum cost of one Python gRPC hop.

`python -m bench.proxy --upstream HOST:PORT --port 0` prints `proxy ready port=N` and forwards every
method of Triton's service path to the upstream until SIGTERM, SIGINT or, when its standard input is a
pipe, that pipe's end (so a crashed bench never leaves it behind).

Messages stay bytes both ways (no protobuf parse or serialize), one channel to the upstream made by the
node's own transport module (same options), multi-callables made once, the deadline passed on and
errors passed back. No metadata is forwarded: that is part of what a mesh hop costs on top of this.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from bench.serving import serve_until_stopped
from meshnode.net import transport
from meshpb import INFERENCE_METHODS, INFERENCE_SERVICE

if TYPE_CHECKING:
    from bench.procs import Child

READY_PREFIX = "proxy ready port="

Context = grpc.aio.ServicerContext[bytes, bytes]
UnaryHandler = Callable[[bytes, Context], Awaitable[bytes]]
StreamHandler = Callable[[AsyncIterator[bytes], Context], AsyncIterator[bytes]]


def _unary(call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]) -> UnaryHandler:
    async def handler(request: bytes, context: Context) -> bytes:
        try:
            response: bytes = await call(request, timeout=context.time_remaining())
            return response
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "")
            raise  # unreachable: abort raises

    return handler


def _streaming(call: grpc.aio.StreamStreamMultiCallable[bytes, bytes]) -> StreamHandler:
    async def handler(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        try:
            async for response in call(requests, timeout=context.time_remaining()):
                yield response
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "")

    return handler


def method_handlers(channel: grpc.aio.Channel) -> dict[str, grpc.RpcMethodHandler[bytes, bytes]]:
    """Every method of the service, request and response left as bytes (no (de)serializers)."""
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}
    for method, (_, _, client_streams, server_streams) in INFERENCE_METHODS.items():
        path = f"/{INFERENCE_SERVICE}/{method}"
        if client_streams and server_streams:
            handlers[method] = grpc.stream_stream_rpc_method_handler(_streaming(channel.stream_stream(path)))
        elif not client_streams and not server_streams:
            handlers[method] = grpc.unary_unary_rpc_method_handler(_unary(channel.unary_unary(path)))
    return handlers


async def serve(upstream: str, host: str, port: int) -> None:
    channel = transport.create_channel(upstream)
    server = transport.create_server()
    handlers = method_handlers(channel)
    # Registered as the node registers its own (transport.add_inference_service), so lookup costs match.
    transport.add_registered_method_handlers(server, INFERENCE_SERVICE, handlers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(INFERENCE_SERVICE, handlers),))
    bound = transport.bind(server, host, port)
    await server.start()
    try:
        await serve_until_stopped(f"{READY_PREFIX}{bound}")
    finally:
        await server.stop(0)
        await channel.close()


class ProxyProcess:
    """The proxy as a child on pipes (it exits when they close, even if its launcher is killed)."""

    def __init__(self, upstream: str, timeout_s: float = 30.0) -> None:
        # Imported here: bench.procs brings numpy and onnxruntime (through bench.floor), which the
        # proxy process itself, importing this module, has no use for.
        from bench.procs import Child, ChildError

        self.child: Child = Child([sys.executable, "-m", "bench.proxy", "--upstream", upstream, "--port", "0"],
                                    "proxy")
        try:
            line = self.child.readline(timeout_s)
            if not line.startswith(READY_PREFIX):
                raise ChildError(f"proxy printed {line!r} instead of its port")
        except BaseException:
            self.child.stop()
            raise
        self.pid = self.child.pid
        self.target = f"127.0.0.1:{int(line[len(READY_PREFIX):])}"

    def stop(self) -> None:
        self.child.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the server behind the proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    args: Any = parser.parse_args(argv)
    asyncio.run(serve(args.upstream, args.host, args.port))


if __name__ == "__main__":
    main()
