"""Traces across the mesh, received by a real OTLP collector endpoint (tests/integration/otlp_receiver.py).

Two traced nodes: n0 cannot hold the model (its capacity is smaller), so a request sent to it is forwarded to
n1, which loads the model and runs it. The client's traceparent starts the trace; every span of both nodes
joins it, in parent/child order. A node with tracing off sends nothing and passes the client's trace context on
as it came.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from deploy.local.models import write_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from tests.integration.helpers import wait_until_blocking
from tests.integration.otlp_receiver import OtlpReceiver, ReceivedSpan, otlp_receiver

SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
INFER = "inference.GRPCInferenceService/ModelInfer"
# Spans leave a node in batches this often (ms), so that a test does not wait the default 5 s.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}
SMALL = "50kB"  # less than the model: a node this small forwards every request for it


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("traced-repo")
    write_mlp(root, "mlp", approx_bytes=200_000)
    return root


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as started:
        yield started


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"traced-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def traced_mesh(etcd: EtcdProcess, repo: Path, receiver: OtlpReceiver, prefix: str) -> Iterator[list[NodeProcess]]:
    nodes: list[NodeProcess] = []
    try:
        # n0 is too small for the model (~200 kB): placement loads it on n1, and n0 forwards.
        for name, capacity in (("n0", SMALL), ("n1", "64MiB")):
            nodes.append(NodeProcess.start(
                etcd=etcd.endpoint, model_repository=repo, capacity=capacity, etcd_prefix=prefix, instance_id=name,
                extra_args=["--no-proactive-loads", "--otlp-endpoint", receiver.endpoint], env=FAST_EXPORT))
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def infer(target: str, traceparent: str | None = None) -> None:
    x = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32))
    with grpcclient.InferenceServerClient(target) as client:
        client.infer("mlp", [x], headers={"traceparent": traceparent} if traceparent else None)


def new_trace() -> tuple[str, str, str]:
    """A client's trace id and span id, and the traceparent that carries them."""
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def received(receiver: OtlpReceiver, trace_id: str, servers_on: set[str]) -> list[ReceivedSpan]:
    """The trace's spans once the server span of each node in `servers_on` has arrived: a node's server span
    ends after every other span the node made for the request, so its batch is the last of them."""
    def complete() -> bool:
        return {s.node for s in receiver.spans(trace_id) if s.kind == SERVER} >= servers_on

    wait_until_blocking(complete, 20, f"server spans of trace {trace_id} from {sorted(servers_on)}")
    return receiver.spans(trace_id)


def one(spans: list[ReceivedSpan], node: str, name: str, kind: int | None = None) -> ReceivedSpan:
    found = [s for s in spans if s.node == node and s.name == name and (kind is None or s.kind == kind)]
    assert len(found) == 1, f"{name} on {node}: {found} in {spans}"
    return found[0]


def test_a_forwarded_request_that_loads_is_one_trace_across_both_nodes(
        traced_mesh: list[NodeProcess], receiver: OtlpReceiver) -> None:
    trace_id, client_span, traceparent = new_trace()
    infer(traced_mesh[0].target, traceparent)

    spans = received(receiver, trace_id, {"n0", "n1"})

    entry = one(spans, "n0", INFER, SERVER)
    assert entry.parent_id == client_span  # continues the client's trace
    assert entry.attributes.items() >= {
        "rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": "ModelInfer",
        "rpc.grpc.status_code": 0, "server.address": "127.0.0.1", "meshserve.model": "mlp", "meshserve.hops": 0,
        "meshserve.mode": "any", "meshserve.outcome": "routed"}.items()
    route = one(spans, "n0", "meshserve.route")
    assert route.parent_id == entry.span_id
    assert route.attributes.items() >= {"meshserve.route.chosen": "n1", "meshserve.route.reason": "load",
                                        "meshserve.route.candidates": 0}.items()
    forward = one(spans, "n0", INFER, CLIENT)
    assert forward.parent_id == entry.span_id
    assert forward.attributes.items() >= {"rpc.system": "grpc", "rpc.method": "ModelInfer",
                                          "rpc.grpc.status_code": 0, "server.address": "127.0.0.1"}.items()
    served = one(spans, "n1", INFER, SERVER)
    assert served.parent_id == forward.span_id  # the hop carried n0's client span as the parent
    assert served.attributes["meshserve.hops"] == 1
    assert served.attributes["meshserve.mode"] in ("load", "load-last")
    queued = one(spans, "n1", "meshserve.load_queue")
    load = one(spans, "n1", "meshserve.load")
    run = one(spans, "n1", "meshserve.run")
    assert queued.parent_id == load.parent_id == run.parent_id == served.span_id
    assert load.attributes["meshserve.model.size_bytes"] > 100_000
    assert run.attributes.items() >= {"meshserve.model": "mlp", "meshserve.version": "1"}.items()
    assert {s.node for s in spans} == {"n0", "n1"}
    assert all(s.status_code != 2 for s in spans)  # no span ended in error


def test_a_local_hit_is_the_short_trace(traced_mesh: list[NodeProcess], receiver: OtlpReceiver) -> None:
    infer(traced_mesh[1].target)  # loaded on n1 by now, or loads now: the second request is the hit
    trace_id, client_span, traceparent = new_trace()
    infer(traced_mesh[1].target, traceparent)

    spans = received(receiver, trace_id, {"n1"})

    # One span: a hit's run is its server span (tracing's cost on the hit path is one span).
    (entry,) = spans
    assert entry.parent_id == client_span
    assert entry.node == "n1" and entry.name == INFER and entry.kind == SERVER
    assert entry.attributes.items() >= {"meshserve.outcome": "hit", "meshserve.model": "mlp",
                                        "rpc.grpc.status_code": 0}.items()


def test_tracing_off_sends_nothing(etcd: EtcdProcess, repo: Path, receiver: OtlpReceiver, prefix: str,
                                   traced_mesh: list[NodeProcess]) -> None:
    # A node without tracing in the traced mesh: it forwards to n1's copy.
    node = NodeProcess.start(etcd=etcd.endpoint, model_repository=repo, capacity=SMALL, etcd_prefix=prefix,
                             instance_id="off", extra_args=["--no-proactive-loads"], env=FAST_EXPORT)
    try:
        trace_id, client_span, traceparent = new_trace()
        infer(node.target, traceparent)
        spans = received(receiver, trace_id, {"n1"})
        # The client's context went on untouched: n1's span is the client's child, no span of "off" between.
        assert one(spans, "n1", INFER, SERVER).parent_id == client_span
    finally:
        assert node.stop() == 0  # a traced node would export what it still holds as it stops

    assert not [s for s in receiver.spans() if s.node == "off"]
