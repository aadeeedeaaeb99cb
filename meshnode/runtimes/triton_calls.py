"""What the Triton runtime sends with its calls to Triton: the trace context, and on a stream each request's
version (Triton holds a name's versions side by side)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshnode.net import transport
from meshnode.runtimes.base import CallerMetadata, ResponseSink
from meshpb import pb
from router.hop import trace_context

_W3C = TraceContextTextMapPropagator()


def trace_metadata(caller_metadata: CallerMetadata | None) -> tuple[tuple[str, str], ...] | None:
    """Triton's trace continues from the node's span running this request when the node traces (the
    propagator writes nothing without one), else from the caller's trace context, passed on as it came."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    trace = tuple(carrier.items()) or (trace_context(caller_metadata()) if caller_metadata is not None else ())
    return trace or None


class VersionStream(transport.CallStream):
    """Triton may hold other versions of the name: each request names the copy's, or Triton answers with its
    newest."""

    def __init__(self, call: grpc.aio.StreamStreamCall[pb.ModelInferRequest, pb.ModelStreamInferResponse],
                 sink: ResponseSink, failed: Callable[[grpc.aio.AioRpcError], pb.ModelStreamInferResponse],
                 version: str) -> None:
        super().__init__(call, sink, failed)
        self._version = version

    async def send(self, request: pb.ModelInferRequest) -> None:
        request.model_version = self._version
        await super().send(request)
