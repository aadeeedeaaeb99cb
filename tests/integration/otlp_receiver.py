"""A real OTLP trace receiver for the tests: OTLP's TraceService/Export over gRPC, on a free loopback port.

It runs on an event loop of its own in a thread, so tests of any kind (sync or async, any fixture scope) read
what it received. The server comes from meshnode.net.transport, as every gRPC server of the project does.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from meshnode.net import transport


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # hex, as in a traceparent
    span_id: str
    parent_id: str  # '' for a root span
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int  # 2: error

    @property
    def node(self) -> str:
        return str(self.resource.get("service.instance.id", ""))


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,  # noqa: N802 (OTLP's name)
                     context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        received = [
            ReceivedSpan(span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), span.name, span.kind,
                         _attributes(span.attributes), _attributes(resource_spans.resource.attributes),
                         span.status.code)
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]
        self._receiver.add(received)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.exports = 0
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)
            self.exports += 1

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A receiver serving until the block ends."""
    receiver = OtlpReceiver()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: asyncio.Event | None = None
    failure: list[BaseException] = []

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        server = transport.create_server()
        # opentelemetry-proto's generated registration is untyped.
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(receiver), server)
        try:
            receiver.port = transport.bind(server, "127.0.0.1", 0)
            await server.start()
        except BaseException as error:
            failure.append(error)
            started.set()
            raise
        started.set()
        await stop.wait()
        await server.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), name="otlp-receiver", daemon=True)
    thread.start()
    try:
        if not started.wait(10) or failure:
            raise RuntimeError(f"the OTLP receiver did not start: {failure}")
        yield receiver
    finally:
        if stop is not None:
            loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
