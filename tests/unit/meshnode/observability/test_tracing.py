import asyncio
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from meshnode.errors import ModelNotFound
from meshnode.observability.tracing import Tracing, status_code, tracer_provider
from meshnode.runtimes.triton import TritonModel
from meshnode.storage.repository import ModelSource
from meshpb import pb
from router.errors import Overloaded
from router.hop import Hop, Mode

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
INFER = "inference.GRPCInferenceService/ModelInfer"


@pytest.fixture
def exported() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exported: InMemorySpanExporter) -> Tracing:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    return Tracing(provider.get_tracer("test"), "10.0.0.1")


def by_name(exported: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name + ("/client" if span.kind is SpanKind.CLIENT else ""): span
            for span in exported.get_finished_spans()}


def test_off_unless_an_endpoint_is_given_or_set() -> None:
    assert tracer_provider(None, {}, "n0") is None
    assert tracer_provider("", {"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, "n0") is None


@pytest.mark.parametrize("endpoint, environ", [
    ("http://127.0.0.1:1", {}),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}),
    (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1"}),
])
def test_on_with_the_flag_or_either_otel_variable(endpoint: str | None, environ: dict[str, str]) -> None:
    provider = tracer_provider(endpoint, environ, "n7")
    assert provider is not None
    try:
        assert provider.resource.attributes["service.instance.id"] == "n7"
        assert provider.resource.attributes["service.name"] == "meshserve"
        assert provider.sampler.get_description().startswith("ParentBased{root:AlwaysOnSampler")
    finally:
        provider.shutdown()


def test_the_sampler_and_service_name_come_from_the_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "inference-mesh")
    provider = tracer_provider("http://127.0.0.1:1", {"OTEL_SERVICE_NAME": "inference-mesh"}, "n0")
    assert provider is not None
    try:
        assert "TraceIdRatioBased{0.25}" in provider.sampler.get_description()
        assert provider.resource.attributes["service.name"] == "inference-mesh"
    finally:
        provider.shutdown()


def test_a_server_span_continues_the_callers_trace(tracing: Tracing, exported: InMemorySpanExporter) -> None:
    with tracing.server("ModelInfer", (("traceparent", TRACEPARENT.encode()), ("other", "x"))) as span:
        tracing.describe(span, "ModelInfer", "m", "2", Hop(1, ("n1",), Mode.LOAD))
        tracing.routed(Hop(1, ("n1",), Mode.LOAD))

    (got,) = exported.get_finished_spans()
    assert got.name == INFER and got.kind is SpanKind.SERVER
    assert format(got.context.trace_id, "032x") == CLIENT_TRACE
    assert got.parent is not None and format(got.parent.span_id, "016x") == CLIENT_SPAN
    assert dict(got.attributes or {}) == {
        "rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": "ModelInfer",
        "server.address": "10.0.0.1", "meshserve.model": "m", "meshserve.version": "2",
        "meshserve.hops": 1, "meshserve.mode": "load", "meshserve.outcome": "routed", "rpc.grpc.status_code": 0}


def test_without_a_caller_context_the_server_span_starts_a_trace(tracing: Tracing,
                                                                 exported: InMemorySpanExporter) -> None:
    with tracing.server("ModelInfer", None):
        pass
    with tracing.server("ModelInfer", (("traceparent", "garbage"),)):
        pass

    assert [s.parent for s in exported.get_finished_spans()] == [None, None]


def test_an_error_ends_the_server_span_with_its_status(tracing: Tracing, exported: InMemorySpanExporter) -> None:
    with pytest.raises(ModelNotFound), tracing.server("ModelInfer", None):
        raise ModelNotFound.unknown("m")

    (got,) = exported.get_finished_spans()
    assert got.attributes is not None and got.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert got.status.status_code is StatusCode.ERROR
    assert [e.name for e in got.events] == ["exception"]


async def test_a_forward_is_a_client_span_whose_context_travels(tracing: Tracing,
                                                                exported: InMemorySpanExporter) -> None:
    with tracing.server("ModelInfer", (("traceparent", TRACEPARENT),)):
        with tracing.client("ModelInfer", "10.0.0.2:8033") as sent:
            pass
        refused = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
        with pytest.raises(grpc.aio.AioRpcError), tracing.client("ModelInfer", "10.0.0.3:8033"):
            raise refused

    spans = exported.get_finished_spans()
    first, retry, server = spans
    assert first.kind is retry.kind is SpanKind.CLIENT
    assert first.parent is not None and server.context is not None
    assert first.parent.span_id == retry.parent.span_id == server.context.span_id  # type: ignore[union-attr]
    assert dict(sent) == {"traceparent": f"00-{CLIENT_TRACE}-{format(first.context.span_id, '016x')}-01"}
    assert dict(first.attributes or {}).items() >= {"server.address": "10.0.0.2", "server.port": 8033,
                                                    "rpc.grpc.status_code": 0}.items()
    assert (retry.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert retry.status.status_code is StatusCode.ERROR


def test_a_routing_decision_is_a_span_from_its_start(tracing: Tracing, exported: InMemorySpanExporter) -> None:
    with tracing.server("ModelInfer", None):
        tracing.decided("m", 1_000_000_000, "n2", 3, "copy")

    decision, server = exported.get_finished_spans()
    assert decision.name == "meshserve.route" and decision.start_time == 1_000_000_000
    assert decision.parent is not None and decision.parent.span_id == server.context.span_id  # type: ignore[union-attr]
    assert dict(decision.attributes or {}) == {"meshserve.model": "m", "meshserve.route.candidates": 3,
                                               "meshserve.route.chosen": "n2", "meshserve.route.reason": "copy"}


@dataclass
class Loaded:
    size_bytes: int


async def test_load_and_run_spans_nest_what_they_await(tracing: Tracing, exported: InMemorySpanExporter) -> None:
    async def load() -> Loaded:
        with tracing.client("RepositoryModelLoad", "triton:8001"):  # what a runtime calls: a child of the load
            await asyncio.sleep(0)
        return Loaded(4096)

    async def run() -> str:
        return "answer"

    with tracing.server("ModelInfer", None):
        loaded = await tracing.load(load(), "m", "1", queued_ms=20.0)
        assert await tracing.run(run(), "m", "1") == "answer"

    spans = by_name(exported)
    server = spans[INFER]
    assert loaded.size_bytes == 4096
    assert spans["meshserve.load"].attributes == {"meshserve.model": "m", "meshserve.version": "1",
                                                  "meshserve.model.size_bytes": 4096}
    queued = spans["meshserve.load_queue"]
    assert queued.end_time is not None and queued.start_time is not None
    assert queued.end_time - queued.start_time == 20_000_000
    assert spans["inference.GRPCInferenceService/RepositoryModelLoad/client"].parent.span_id == (  # type: ignore[union-attr]
        spans["meshserve.load"].context.span_id)
    for name in ("meshserve.load", "meshserve.load_queue", "meshserve.run"):
        assert spans[name].parent.span_id == server.context.span_id  # type: ignore[union-attr]


def test_an_unsampled_request_records_nothing_but_passes_its_context_on(exported: InMemorySpanExporter) -> None:
    provider = TracerProvider(sampler=ALWAYS_OFF, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracing = Tracing(provider.get_tracer("test"))

    with tracing.server("ModelInfer", None) as span:
        assert not span.is_recording()
        with tracing.client("ModelInfer", "peer:1") as sent:
            pass
        tracing.decided("m", 0, "n1", 0, "load")

    assert exported.get_finished_spans() == ()
    assert int(dict(sent)["traceparent"][-2:], 16) & 1 == 0  # not sampled: the peer does not sample it either


def test_status_codes_are_those_a_client_gets() -> None:
    assert status_code(None) is grpc.StatusCode.OK
    assert status_code(Overloaded("busy")) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code(asyncio.CancelledError()) is grpc.StatusCode.CANCELLED
    assert status_code(ValueError("bug")) is grpc.StatusCode.INTERNAL


class RecordingTriton:
    """The TritonRuntime a TritonModel calls: its stub records the metadata each ModelInfer sends."""

    def __init__(self) -> None:
        self.stub = self
        self.sent: list[tuple[tuple[str, str], ...] | None] = []

    async def ModelInfer(self, request: pb.ModelInferRequest, timeout: float | None,  # noqa: N802, ASYNC109
                         metadata: tuple[tuple[str, str], ...] | None) -> pb.ModelInferResponse:  # gRPC's names
        self.sent.append(metadata)
        return pb.ModelInferResponse()


async def test_triton_continues_from_the_nodes_span_else_from_the_caller(tracing: Tracing,
                                                                         exported: InMemorySpanExporter) -> None:
    triton = RecordingTriton()
    model = TritonModel(triton, ModelSource("m", "1", Path("/m/1"), Path("/m/1/model.onnx")),  # type: ignore[arg-type]
                        SimpleNamespace(platform="onnxruntime_onnx", inputs=[], outputs=[]), 0)
    caller = ((("traceparent", TRACEPARENT), ("x-other", "1")))

    await model.infer(pb.ModelInferRequest(model_name="m"), None, lambda: caller)
    with tracing.server("ModelInfer", caller):
        await tracing.run(model.infer(pb.ModelInferRequest(model_name="m"), None, lambda: caller), "m", "1")

    run = by_name(exported)["meshserve.run"]
    assert triton.sent == [(("traceparent", TRACEPARENT),),
                           (("traceparent", f"00-{CLIENT_TRACE}-{format(run.context.span_id, '016x')}-01"),)]


def test_a_clients_hit_leaves_the_hop_out(tracing: Tracing, exported: InMemorySpanExporter) -> None:
    with tracing.server("ModelInfer", None) as span:
        tracing.describe(span, "ModelInfer", "m", "", Hop())
    with tracing.server("ModelInfer", None) as span:
        tracing.describe(span, "ModelInfer", "m", "", Hop())
        tracing.routed(Hop())

    hit, routed = ((s.attributes or {}) for s in exported.get_finished_spans())
    assert "meshserve.hops" not in hit and hit["meshserve.outcome"] == "hit"
    assert routed["meshserve.hops"] == 0 and routed["meshserve.mode"] == "any"
    assert routed["meshserve.outcome"] == "routed"

