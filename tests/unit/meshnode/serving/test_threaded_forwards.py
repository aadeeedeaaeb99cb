"""ThreadedForwards: a client's plain request that a peer's loaded copy serves is sent from the calling thread as
its own bytes plus the hop, and the peer's bytes are the answer; anything else is left to the loop path (None),
with no peer called and nothing counted.

Fakes for the mesh view and the peers, stand-ins for the dataplane's and the cache's counts and lock, a real
PeerLoad (the outstanding calls and suspects the route reads).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from meshnode.net.peer_load import PeerLoad
from meshnode.net.threaded_peers import Entries, ThreadedPeers
from meshnode.observability.tracing import Tracing
from meshnode.serving.cache import ModelCache
from meshnode.serving.dataplane import DataPlane
from meshnode.serving.threaded_forwards import NOT_TAKEN, Declined, ThreadedForwards
from meshnode.serving.threaded_hits import Forwarded, ThreadedHits
from meshpb import pb
from placement.types import LOADED, LOADING, CopyView, ModelView, NodeView
from router.errors import MeshError, Overloaded, PeerError
from router.hop import HOPS_KEY, PARAMETER_KEY
from router.ports import MeshView
from router.sequences import SEQUENCE_ID

pytestmark = pytest.mark.timeout(20)

ME = "n0"
HOP = f"1|copy|{ME}"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"
ANSWER = pb.ModelInferResponse(model_name="m", model_version="1", id="r1").SerializeToString()


def loaded(instance_id: str, since: float, versions: tuple[str, ...] = ("1",), state: str = LOADED) -> CopyView:
    return CopyView(instance_id, state, since, versions)


def model(*copies: CopyView, name: str = "m") -> ModelView:
    return ModelView(name, size_bytes=100, copies=copies, newest_version="1")


@dataclass
class Mesh:
    """The mesh view as the route reads it: models by name, the live nodes."""

    models: dict[str, ModelView]
    live: dict[str, NodeView] = field(default_factory=lambda: {
        iid: NodeView(iid, f"10.0.0.{i}:8033", capacity_bytes=1 << 30, used_bytes=0)
        for i, iid in enumerate((ME, "n1", "n2"))})

    def model(self, name: str) -> ModelView | None:
        return self.models.get(name)

    def nodes(self) -> Mapping[str, NodeView]:
        return self.live


@dataclass
class Plane:
    inflight: int = 0
    max_inflight: int = 8


@dataclass
class Cache:
    ready: dict[tuple[str, str], object] = field(default_factory=dict)
    inflight_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Sent:
    node: str
    data: bytes
    entries: Entries
    budget_s: float | None
    inflight: int  # the dataplane's count while the call was out


@dataclass
class Peers:
    """ThreadedPeers.infer: records each call, answers with the next scripted bytes or raises the next error."""

    plane: Plane
    answers: list[bytes | MeshError] = field(default_factory=lambda: [ANSWER])
    sent: list[Sent] = field(default_factory=list)

    def infer(self, node: NodeView, data: bytes, entries: Entries, budget_s: float | None) -> bytes:
        self.sent.append(Sent(node.instance_id, data, entries, budget_s, self.plane.inflight))
        answer = self.answers.pop(0)
        if isinstance(answer, MeshError):
            raise answer
        return answer


@dataclass
class Hits:
    done_calls: list[Any] = field(default_factory=list)

    def done(self, ran: Any) -> None:
        self.done_calls.append(ran)


@dataclass
class Kit:
    mesh: Mesh
    load: PeerLoad
    plane: Plane
    cache: Cache
    peers: Peers
    hits: Hits
    alias_targets: dict[str, str]
    forwards: ThreadedForwards
    metadata: tuple[tuple[str, str], ...] = ()
    time_left: float | None = 5.0

    def forward(self, request: pb.ModelInferRequest) -> bytes | None:
        metadata, time_left = self.metadata, self.time_left
        return self.forwards.forward(request, request.SerializeToString(), lambda: metadata, lambda: time_left)


def make_kit(tracing: Tracing | None = None) -> Kit:
    mesh = Mesh({"m": model(loaded("n1", 1.0), loaded("n2", 2.0))})
    load, plane, cache, hits, aliases = PeerLoad(), Plane(), Cache(), Hits(), {"front": "m"}
    peers = Peers(plane)
    forwards = ThreadedForwards(
        mesh=cast(MeshView, mesh), peers=cast(ThreadedPeers, peers), load=load, dataplane=cast(DataPlane, plane),
        cache=cast(ModelCache, cache), alias_targets=aliases, hits=cast(ThreadedHits, hits), instance_id=ME,
        tracing=tracing)
    return Kit(mesh, load, plane, cache, peers, hits, aliases, forwards)


@pytest.fixture
def kit() -> Kit:
    return make_kit()


def plain(name: str = "m", version: str = "", **fields: Any) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=name, model_version=version, id="r1",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=[1, 2])],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="Y")],
        raw_input_contents=[b"\x00\x00\x80?\x00\x00\x00@"], **fields)


def with_hop(request: pb.ModelInferRequest) -> pb.ModelInferRequest:
    expected = pb.ModelInferRequest()
    expected.CopyFrom(request)
    expected.parameters[PARAMETER_KEY].string_param = HOP
    return expected


def test_a_plain_request_goes_to_the_least_busy_loaded_copy_as_its_bytes_and_the_hop(kit: Kit) -> None:
    kit.load.started("n1")  # a call out to the oldest copy already: the other one is chosen
    kit.metadata = (("traceparent", TRACEPARENT), ("x-client", "kept here"))
    request = plain(parameters={"priority": pb.InferParameter(int64_param=2)})
    data = request.SerializeToString()

    answer = kit.forward(request)

    assert answer == ANSWER
    (sent,) = kit.peers.sent
    assert (sent.node, sent.budget_s, sent.inflight) == ("n2", 5.0, 1)
    assert sent.data.startswith(data)  # the client's bytes as they came, the hop appended
    assert pb.ModelInferRequest.FromString(sent.data) == with_hop(request)
    assert sent.entries == (("traceparent", TRACEPARENT),)  # only the trace context travels
    (done,) = kit.hits.done_calls
    assert isinstance(done, Forwarded)
    assert (done.model, done.code, done.request_bytes, done.response_bytes) == ("m", "OK", len(data), len(ANSWER))
    assert done.started <= done.ended
    assert kit.plane.inflight == 0 and kit.load.outstanding() == {"n1": 1}


def test_without_a_deadline_the_call_has_no_budget(kit: Kit) -> None:
    kit.time_left = None
    assert kit.forward(plain()) == ANSWER
    assert [(s.node, s.budget_s) for s in kit.peers.sent] == [("n1", None)]  # the oldest copy, all idle


def test_an_alias_is_routed_by_its_targets_view_and_sent_as_the_client_named_it(kit: Kit) -> None:
    request = plain("front")
    assert kit.forward(request) == ANSWER
    (sent,) = kit.peers.sent
    assert sent.node == "n1" and pb.ModelInferRequest.FromString(sent.data) == with_hop(request)
    assert [done.model for done in kit.hits.done_calls] == ["front"]


def test_a_request_for_a_version_a_copy_holds_is_forwarded(kit: Kit) -> None:
    kit.mesh.models["m"] = model(loaded("n1", 1.0, ("1",)), loaded("n2", 2.0, ("1", "2")))
    assert kit.forward(plain(version="2")) == ANSWER
    assert [s.node for s in kit.peers.sent] == ["n2"]


def hop_parameter(kit: Kit) -> pb.ModelInferRequest:
    return plain(parameters={PARAMETER_KEY: pb.InferParameter(string_param="1|copy|n9")})


def sequence(kit: Kit) -> pb.ModelInferRequest:
    return plain(parameters={SEQUENCE_ID: pb.InferParameter(int64_param=7)})


def hop_metadata(kit: Kit) -> pb.ModelInferRequest:
    kit.metadata = ((HOPS_KEY, "1"),)
    return plain()


def ready_here(kit: Kit) -> pb.ModelInferRequest:
    kit.cache.ready[("m", "1")] = object()
    return plain(version="1")


def alias_ready_here(kit: Kit) -> pb.ModelInferRequest:
    kit.cache.ready[("m", "")] = object()
    return plain("front")


def invalid_version(kit: Kit) -> pb.ModelInferRequest:
    return plain(version="x")


def unknown_model(kit: Kit) -> pb.ModelInferRequest:
    return plain("nope")


def chosen_here(kit: Kit) -> pb.ModelInferRequest:
    kit.mesh.models["m"] = model(loaded(ME, 0.5), loaded("n1", 1.0))
    return plain()


def only_loading(kit: Kit) -> pb.ModelInferRequest:
    kit.mesh.models["m"] = model(loaded("n1", 1.0, state=LOADING))
    return plain()


def version_missing(kit: Kit) -> pb.ModelInferRequest:
    return plain(version="2")


def only_copy_suspect(kit: Kit) -> pb.ModelInferRequest:
    kit.mesh.models["m"] = model(loaded("n1", 1.0))
    kit.load.suspect("n1")
    return plain()


def node_full(kit: Kit) -> pb.ModelInferRequest:
    kit.plane.inflight = kit.plane.max_inflight
    return plain()


def out_of_time(kit: Kit) -> pb.ModelInferRequest:
    kit.time_left = 0.0
    return plain()


@pytest.mark.parametrize("case", [
    hop_parameter, sequence, hop_metadata, ready_here, alias_ready_here, invalid_version, unknown_model, chosen_here,
    only_loading, version_missing, only_copy_suspect, node_full, out_of_time,
], ids=lambda case: case.__name__)
def test_anything_but_a_plain_forward_is_left_to_the_loop(kit: Kit,
                                                          case: Callable[[Kit], pb.ModelInferRequest]) -> None:
    request = case(kit)
    before = kit.plane.inflight

    assert kit.forward(request) == NOT_TAKEN

    assert kit.peers.sent == [] and kit.hits.done_calls == []
    assert kit.plane.inflight == before


@pytest.mark.parametrize("error", [
    PeerError(grpc.StatusCode.UNAVAILABLE, "connection refused", retry_elsewhere=True, node="n1"),
    Overloaded("model 'm' has 8 requests waiting on node n1"),
], ids=["unavailable", "overloaded"])
def test_a_failure_another_node_may_mend_is_left_to_the_loop_uncounted(kit: Kit, error: MeshError) -> None:
    kit.peers.answers = [error]
    assert kit.forward(plain()) == Declined(("n1",))  # the loop's router skips n1
    assert [s.node for s in kit.peers.sent] == ["n1"]
    assert kit.hits.done_calls == [] and kit.plane.inflight == 0


def test_a_failure_no_other_node_would_mend_is_raised_and_counted(kit: Kit) -> None:
    error = PeerError(grpc.StatusCode.INVALID_ARGUMENT, "unexpected input 'Z'", retry_elsewhere=False, node="n1")
    kit.peers.answers = [error]
    request = plain()

    with pytest.raises(PeerError) as failed:
        kit.forward(request)

    assert failed.value is error
    (done,) = kit.hits.done_calls
    assert (done.model, done.code, done.request_bytes, done.response_bytes) == (
        "m", "INVALID_ARGUMENT", request.ByteSize(), None)
    assert kit.plane.inflight == 0


def test_traced_a_forward_is_a_server_span_around_a_client_span_whose_context_the_peer_gets() -> None:
    exported = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    kit = make_kit(Tracing(provider.get_tracer("test"), "10.0.0.0"))
    kit.metadata = (("traceparent", TRACEPARENT),)

    assert kit.forward(plain()) == ANSWER

    spans = exported.get_finished_spans()
    (server,) = (s for s in spans if s.kind is SpanKind.SERVER)
    (client,) = (s for s in spans if s.kind is SpanKind.CLIENT)
    assert server.context is not None and client.context is not None and client.parent is not None
    assert format(server.context.trace_id, "032x") == CLIENT_TRACE  # the client's trace continues
    assert client.parent.span_id == server.context.span_id
    assert (server.attributes or {}).get("meshserve.outcome") == "routed"
    assert (client.attributes or {}).get("server.address") == "10.0.0.1"
    (sent,) = kit.peers.sent
    assert sent.entries == (("traceparent", f"00-{CLIENT_TRACE}-{format(client.context.span_id, '016x')}-01"),)
    assert len(kit.hits.done_calls) == 1
