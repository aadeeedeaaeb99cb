"""ThreadedPeers against real grpcio threaded servers on 127.0.0.1: bytes both ways unchanged, the trace context and
the mesh proof as metadata, the budget as the call's deadline, a peer's status as the router sees it (and who
becomes a suspect), the call counted out while it runs, and a channel per peer replaced when the peer left or
moved, closed once its last call ended.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from meshnode.net import transport
from meshnode.net.peer_load import PeerLoad
from meshnode.net.proof import PROOF_KEY, MeshProof
from meshnode.net.threaded_peers import Entries, ThreadedPeers
from meshpb import INFERENCE_SERVICE
from placement.types import NodeView
from router.errors import NOT_HERE_PREFIX, OVERLOADED_PREFIX, MeshError, Overloaded, PeerError
from tests.unit.meshnode.fakes import WAIT_S

pytestmark = pytest.mark.timeout(30)

PATH = f"/{INFERENCE_SERVICE}/ModelInfer"
SECRET = b"a mesh secret of 32 bytes at most"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
DATA = b"\x0a\x01m\x00\xff not even a message: bytes go through untouched"
Answer = Callable[[bytes, grpc.ServicerContext], bytes]


def reply(data: bytes, context: grpc.ServicerContext) -> bytes:
    return b"reply to " + data


def refusing(code: grpc.StatusCode, details: str) -> Answer:
    def refuse(data: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(code, details)

    return refuse


@dataclass
class Received:
    data: bytes
    metadata: tuple[tuple[str, Any], ...]
    time_remaining: float | None


@dataclass
class Peer:
    """A peer's ModelInfer: records each call, waits for `gate` when one is set, then answers with `answer`."""

    answer: Answer = reply
    gate: threading.Event | None = None
    entered: threading.Event = field(default_factory=threading.Event)
    received: list[Received] = field(default_factory=list)

    def model_infer(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        self.received.append(Received(data, tuple(context.invocation_metadata()), context.time_remaining()))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT_S), "the test never opened the gate"
        return self.answer(data, context)


@contextmanager
def serving(peer: Peer) -> Iterator[str]:
    """The peer on a grpcio threaded server, raw bytes in and out; yields its endpoint."""
    server = transport.create_threaded_server(4)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        INFERENCE_SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(peer.model_infer)}),))
    port = transport.bind(server, "127.0.0.1", 0)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        if peer.gate is not None:
            peer.gate.set()
        assert server.stop(None).wait(WAIT_S)


def node(endpoint: str, instance_id: str = "n1") -> NodeView:
    return NodeView(instance_id, endpoint, capacity_bytes=1 << 30, used_bytes=0)


def closed_port() -> int:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port: int = held.getsockname()[1]
    return port


def is_closed(channel: grpc.Channel) -> bool:
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(PATH)
    try:
        call(b"", timeout=WAIT_S)
    except ValueError:
        return True  # grpcio: "Cannot invoke RPC on closed channel!"
    except grpc.RpcError:
        return False
    return False


@pytest.fixture
def load() -> PeerLoad:
    return PeerLoad()


@pytest.fixture
def peers(load: PeerLoad) -> Iterator[ThreadedPeers]:
    made = ThreadedPeers(load)
    yield made
    made.close()


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, grpc.Channel]]:
    """Every channel ThreadedPeers opens, with its endpoint."""
    made: list[tuple[str, grpc.Channel]] = []
    create = transport.create_threaded_channel

    def recording(target: str, *args: Any, **kwargs: Any) -> grpc.Channel:
        channel = create(target, *args, **kwargs)
        made.append((target, channel))
        return channel

    monkeypatch.setattr(transport, "create_threaded_channel", recording)
    return made


@pytest.fixture
def calling() -> Iterator[ThreadPoolExecutor]:
    """A thread for a call the test watches while it is out."""
    with ThreadPoolExecutor(1, thread_name_prefix="caller") as executor:
        yield executor


def test_the_request_and_the_answer_cross_as_bytes_unchanged(peers: ThreadedPeers, load: PeerLoad) -> None:
    peer = Peer()
    with serving(peer) as endpoint:
        answer = peers.infer(node(endpoint), DATA, (), None)
    assert answer == b"reply to " + DATA
    assert [r.data for r in peer.received] == [DATA]
    assert load.outstanding() == {} and load.suspects() == frozenset()


def test_the_trace_context_and_a_proof_the_peer_accepts_travel_as_metadata(load: PeerLoad) -> None:
    peer, proved = Peer(), ThreadedPeers(load, proof=MeshProof(SECRET))
    try:
        with serving(peer) as endpoint:
            proved.infer(node(endpoint), DATA, (("traceparent", TRACEPARENT),), None)
            proved.infer(node(endpoint), DATA, (), None)
    finally:
        proved.close()
    verifier = MeshProof(SECRET)
    traced, bare = (dict(r.metadata) for r in peer.received)
    assert traced["traceparent"] == TRACEPARENT and "traceparent" not in bare
    assert verifier.verify("ModelInfer", traced[PROOF_KEY]) and verifier.verify("ModelInfer", bare[PROOF_KEY])
    assert not MeshProof(b"another secret of the same length").verify("ModelInfer", bare[PROOF_KEY])


def test_without_a_proof_the_entries_are_sent_as_given(peers: ThreadedPeers) -> None:
    peer = Peer()
    entries: Entries = (("traceparent", TRACEPARENT), ("tracestate", "vendor=1"))
    with serving(peer) as endpoint:
        peers.infer(node(endpoint), DATA, entries, None)
    (received,) = peer.received
    assert tuple((key, value) for key, value in received.metadata if key in dict(entries)) == entries
    assert PROOF_KEY not in dict(received.metadata)


def test_the_budget_is_the_calls_deadline(peers: ThreadedPeers) -> None:
    peer = Peer()
    with serving(peer) as endpoint:
        peers.infer(node(endpoint), DATA, (), 5.0)
    (received,) = peer.received
    # gRPC's core rounds the deadline it sends up to its timer's granularity: a little past the budget at once.
    assert received.time_remaining is not None and 4.0 < received.time_remaining <= 5.1


def test_a_call_past_its_budget_fails_deadline_exceeded_on_that_node(peers: ThreadedPeers, load: PeerLoad) -> None:
    peer = Peer(gate=threading.Event())
    with serving(peer) as endpoint, pytest.raises(PeerError) as failed:
        peers.infer(node(endpoint), DATA, (), 0.3)
    assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and not failed.value.retry_elsewhere
    assert failed.value.node == "n1" and load.outstanding() == {}
    assert load.suspects() == frozenset()


@pytest.mark.parametrize(("code", "details", "kind", "retry_elsewhere", "suspect"), [
    (grpc.StatusCode.UNAVAILABLE, "node n1 is draining", PeerError, True, True),
    (grpc.StatusCode.UNAVAILABLE, NOT_HERE_PREFIX + "no copy of model 'm' on node n1", PeerError, True, False),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, OVERLOADED_PREFIX + "model 'm' has 8 requests waiting on node n1",
     Overloaded, True, False),
    (grpc.StatusCode.INVALID_ARGUMENT, "unexpected inference input 'X' for model 'm'", PeerError, False, False),
])
def test_a_peers_status_comes_back_as_the_router_sees_it(
        peers: ThreadedPeers, load: PeerLoad, code: grpc.StatusCode, details: str, kind: type[MeshError],
        retry_elsewhere: bool, suspect: bool) -> None:
    with serving(Peer(refusing(code, details))) as endpoint, pytest.raises(MeshError) as failed:
        peers.infer(node(endpoint), DATA, (), WAIT_S)
    error = failed.value
    assert type(error) is kind and error.code == code and str(error) == details
    assert error.retry_elsewhere is retry_elsewhere and error.node == "n1"
    assert load.suspects() == ({"n1"} if suspect else frozenset())
    assert load.outstanding() == {}


def test_a_dead_endpoint_is_unavailable_and_its_peer_a_suspect(peers: ThreadedPeers, load: PeerLoad) -> None:
    with pytest.raises(PeerError) as failed:
        peers.infer(node(f"127.0.0.1:{closed_port()}"), DATA, (), WAIT_S)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE and failed.value.retry_elsewhere
    assert failed.value.node == "n1"
    assert load.suspects() == {"n1"} and load.outstanding() == {}


def test_a_call_is_outstanding_while_it_runs_and_only_then(peers: ThreadedPeers, load: PeerLoad,
                                                           calling: ThreadPoolExecutor) -> None:
    peer = Peer(gate=threading.Event())
    with serving(peer) as endpoint:
        call = calling.submit(peers.infer, node(endpoint), DATA, (), WAIT_S)
        assert peer.entered.wait(WAIT_S)
        assert load.outstanding() == {"n1": 1}
        assert peer.gate is not None
        peer.gate.set()
        assert call.result(WAIT_S) == b"reply to " + DATA
    assert load.outstanding() == {}


def test_a_forgotten_peers_channel_serves_its_call_out_then_closes_and_a_later_call_opens_another(
        peers: ThreadedPeers, opened: list[tuple[str, grpc.Channel]], calling: ThreadPoolExecutor) -> None:
    peer = Peer(gate=threading.Event())
    with serving(peer) as endpoint:
        call = calling.submit(peers.infer, node(endpoint), DATA, (), WAIT_S)
        assert peer.entered.wait(WAIT_S)
        peers.forget("n1")
        assert peer.gate is not None
        peer.gate.set()
        assert call.result(WAIT_S) == b"reply to " + DATA  # not cancelled by the channel's close
        (_, first), = opened
        assert is_closed(first)  # by the end of its last call

        assert peers.infer(node(endpoint), b"again", (), WAIT_S) == b"reply to again"
    assert [target for target, _ in opened] == [endpoint, endpoint]
    assert not is_closed(opened[1][1])


def test_calls_to_one_peer_share_its_channel(peers: ThreadedPeers, opened: list[tuple[str, grpc.Channel]]) -> None:
    with serving(Peer()) as endpoint:
        for _ in range(3):
            peers.infer(node(endpoint), DATA, (), WAIT_S)
    assert len(opened) == 1


def test_a_peer_at_a_new_endpoint_gets_a_new_channel_and_the_old_one_closes(
        peers: ThreadedPeers, opened: list[tuple[str, grpc.Channel]]) -> None:
    def answering(name: bytes) -> Answer:
        return lambda data, context: name

    with serving(Peer(answering(b"old"))) as before, serving(Peer(answering(b"new"))) as after:
        assert peers.infer(node(before), DATA, (), WAIT_S) == b"old"
        assert peers.infer(node(after), DATA, (), WAIT_S) == b"new"  # the same id, restarted elsewhere
        assert [target for target, _ in opened] == [before, after]
        assert is_closed(opened[0][1]) and not is_closed(opened[1][1])


def test_close_closes_every_channel(load: PeerLoad, opened: list[tuple[str, grpc.Channel]]) -> None:
    peers = ThreadedPeers(load)
    with serving(Peer()) as first, serving(Peer()) as second:
        peers.infer(node(first, "n1"), DATA, (), WAIT_S)
        peers.infer(node(second, "n2"), DATA, (), WAIT_S)
        peers.close()
    assert [is_closed(channel) for _, channel in opened] == [True, True]



def test_close_ends_the_calls_still_out_at_once_and_a_later_calls_channel_with_it(
        load: PeerLoad, opened: list[tuple[str, grpc.Channel]], calling: ThreadPoolExecutor) -> None:
    peers, peer = ThreadedPeers(load), Peer(gate=threading.Event())
    with serving(peer) as endpoint:
        call = calling.submit(peers.infer, node(endpoint), DATA, (), 60.0)
        assert peer.entered.wait(WAIT_S)
        peers.close()  # the node is stopping: the poller waiting in the call must not wait for the peer
        with pytest.raises(PeerError) as failed:
            call.result(WAIT_S)
        assert failed.value.code == grpc.StatusCode.CANCELLED and load.outstanding() == {}
        assert peer.gate is not None
        peer.gate.set()
        # A poller still forwarding as the node stops gets a channel of its own, closed with its call.
        assert peers.infer(node(endpoint), b"late", (), WAIT_S) == b"reply to late"
    assert [is_closed(channel) for _, channel in opened] == [True, True]
