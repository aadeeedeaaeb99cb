"""OpenTelemetry traces of the request path: which node a request entered, where it was routed, the forwards
and their retries, the load it waited for, the run. Exported over OTLP/gRPC in batches, off the request path.

Tracing is on when `--otlp-endpoint` or OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is
set; every other OTEL_* variable (headers, OTEL_TRACES_SAMPLER and its argument, OTEL_SERVICE_NAME,
OTEL_BSP_*) is read by the SDK as usual. Off, the node holds no `Tracing` at all and each part checks `None`
once per request: no span, no context switch, no attribute is made.

Span names and attributes follow OpenTelemetry's RPC semantic conventions (`inference.GRPCInferenceService/
ModelInfer`, rpc.system, rpc.service, rpc.method, rpc.grpc.status_code, server.address), plus meshserve.*
attributes for what only the mesh knows. Attributes are set only on spans the sampler records.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol, TypeVar

import grpc
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.semconv._incubating.attributes.rpc_attributes import (
    RPC_GRPC_STATUS_CODE,
    RPC_METHOD,
    RPC_SERVICE,
    RPC_SYSTEM,
)
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.trace import Span, SpanKind, Tracer, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from router.errors import MeshError
from router.hop import Hop

__all__ = ["ENDPOINT_VARIABLES", "INFERENCE_SERVICE", "Tracing", "status_code", "tracer_provider"]

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
INFERENCE_SERVICE = "inference.GRPCInferenceService"
DEFAULT_SERVICE_NAME = "meshserve"

T = TypeVar("T")
Metadata = Iterable[tuple[str, str | bytes]]

# W3C trace context only (traceparent, tracestate): what clients, peers and Triton speak.
_PROPAGATOR = TraceContextTextMapPropagator()


def tracer_provider(endpoint: str | None, environ: Mapping[str, str], instance_id: str) -> TracerProvider | None:
    """The SDK provider exporting to OTLP, or None when tracing is off. The caller shuts it down (a flush)."""
    if not endpoint and not any(environ.get(name) for name in ENDPOINT_VARIABLES):
        return None
    # Imported only when on: the exporter pulls in its generated protos and a gRPC channel.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    attributes: dict[str, str] = {SERVICE_INSTANCE_ID: instance_id}
    if not environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    # No sampler given: the SDK reads OTEL_TRACES_SAMPLER(_ARG), parentbased_always_on by default.
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint or None)))
    return provider


def status_code(error: BaseException | None) -> grpc.StatusCode:
    """The status a client gets for `error` (meshnode.api.status maps them the same way)."""
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, MeshError):
        return error.code
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


class Sized(Protocol):
    @property
    def size_bytes(self) -> int: ...


S = TypeVar("S", bound=Sized)


class _MetadataGetter(Getter[Metadata]):
    def get(self, carrier: Metadata, key: str) -> list[str] | None:
        found = [v.decode(errors="replace") if isinstance(v, bytes) else v for k, v in carrier if k == key]
        return found or None

    def keys(self, carrier: Metadata) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _MetadataGetter()


def _rpc(method: str) -> dict[str, str]:
    return {RPC_SYSTEM: "grpc", RPC_SERVICE: INFERENCE_SERVICE, RPC_METHOD: method}


def _hop(hop: Hop) -> dict[str, str | int]:
    return {"meshserve.hops": hop.hops, "meshserve.mode": hop.mode.value}


def _end_status(span: Span, error: BaseException | None) -> None:
    if span.is_recording():
        span.set_attribute(RPC_GRPC_STATUS_CODE, status_code(error).value[0])


class Tracing:
    """The node's tracer and the spans the request path makes with it."""

    def __init__(self, tracer: Tracer, host: str = "") -> None:
        """`host`: where this node is reached (server.address of its server spans)."""
        self._tracer = tracer
        self._host = host

    @contextmanager
    def server(self, method: str, metadata: Metadata | None) -> Iterator[Span]:
        """The span of one call this node serves, continuing the caller's trace from its `traceparent`."""
        parent = _PROPAGATOR.extract(metadata, context=Context(), getter=_GETTER) if metadata else None
        with self._tracer.start_as_current_span(f"{INFERENCE_SERVICE}/{method}", context=parent,
                                                kind=SpanKind.SERVER) as span:
            try:
                yield span
            except BaseException as error:
                _end_status(span, error)
                raise
            _end_status(span, None)

    def describe(self, span: Span, method: str, model: str, version: str, hop: Hop) -> None:
        """What a recording server span says of an inference request, set in one call: each attribute costs
        ~2 µs here and as much again to export, so a client's hit (hop count 0, mode any) leaves the hop out.
        Its outcome is "hit" until `routed` says otherwise."""
        attributes: dict[str, str | int] = {**_rpc(method), SERVER_ADDRESS: self._host, "meshserve.model": model,
                                            "meshserve.version": version, "meshserve.outcome": "hit"}
        span.set_attributes(attributes | _hop(hop) if hop.hops else attributes)

    @staticmethod
    def routed(hop: Hop) -> None:
        """The current request missed the copies here: the router's spans say where it went."""
        span = get_current_span()
        if span.is_recording():
            span.set_attributes(_hop(hop) | {"meshserve.outcome": "routed"})

    @contextmanager
    def client(self, method: str, endpoint: str) -> Iterator[tuple[tuple[str, str], ...]]:
        """A call to a peer: yields the trace context entries to send as its metadata."""
        with self._tracer.start_as_current_span(f"{INFERENCE_SERVICE}/{method}", kind=SpanKind.CLIENT) as span:
            if span.is_recording():
                host, _, port = endpoint.rpartition(":")
                span.set_attributes({**_rpc(method), SERVER_ADDRESS: host or port,
                                     **({SERVER_PORT: int(port)} if host and port.isdigit() else {})})
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier)
            try:
                yield tuple(carrier.items())
            except grpc.aio.AioRpcError as error:
                if span.is_recording():
                    span.set_attribute(RPC_GRPC_STATUS_CODE, error.code().value[0])
                raise
            except BaseException as error:
                _end_status(span, error)
                raise
            _end_status(span, None)

    def decided(self, model: str, started_ns: int, chosen: str, candidates: int, reason: str) -> None:
        """One routing decision (router.ports.RouteTracer): from `started_ns` until now."""
        span = self._tracer.start_span("meshserve.route", start_time=started_ns)
        if span.is_recording():
            span.set_attributes({"meshserve.model": model, "meshserve.route.candidates": candidates,
                                 "meshserve.route.chosen": chosen, "meshserve.route.reason": reason})
        span.end()

    async def run(self, call: Awaitable[T], model: str, version: str) -> T:
        """Serving a request the router sent to this node's copy (a miss, or a peer's); a runtime's own calls
        (Triton's) are its children. A hit has no span of its own: its server span is the run, at half the
        cost of two spans (an SDK span and its OTLP encoding cost ~40 µs each here)."""
        with self._tracer.start_as_current_span("meshserve.run") as span:
            if span.is_recording():
                span.set_attributes({"meshserve.model": model, "meshserve.version": version})
            return await call

    async def load(self, load: Awaitable[S], model: str, version: str, queued_ms: float) -> S:
        """A load, after `queued_ms` in the load queue (a span of its own, ending now)."""
        now = time.time_ns()
        attributes = {"meshserve.model": model, "meshserve.version": version}
        queued = self._tracer.start_span("meshserve.load_queue", start_time=now - int(queued_ms * 1e6),
                                         attributes=attributes)
        queued.end(now)
        with self._tracer.start_as_current_span("meshserve.load", attributes=attributes) as span:
            loaded = await load
            if span.is_recording():
                span.set_attribute("meshserve.model.size_bytes", loaded.size_bytes)
            return loaded
