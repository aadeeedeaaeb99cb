"""ModelInfer forwarded to a peer from the threaded server's polling threads: bytes in, bytes out.

The caller sends the request's bytes as its client sent them (plus the hop, appended as bytes) and replies with
the peer's bytes: nothing is parsed or written again on the way. The call blocks the polling thread that took
the client's call, in grpcio's C core with the GIL released: no event loop, no other thread, a completion queue
per call that the waiting thread polls itself. The threaded server starts more pollers while every one is busy.

One grpcio channel per peer, beside the event loop's (net.peers), under the same TLS or mesh proof; the calls
out and the suspects are counted in net.peer_load, shared with the loop's forwards, so both route by one view.
A channel whose peer left or moved is closed when its last call ends.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import grpc

from meshnode.net import transport
from meshnode.net.peer_load import PeerLoad
from meshnode.net.peers import forward_failed
from meshnode.net.proof import MeshProof
from meshnode.net.tls import ClientTls
from meshpb import INFERENCE_SERVICE
from placement.types import NodeView

METHOD = "ModelInfer"
Entries = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class _Channel:
    endpoint: str
    channel: grpc.Channel
    infer: grpc.UnaryUnaryMultiCallable[bytes, bytes] = field(init=False)
    calls: int = 0
    gone: bool = False

    def __post_init__(self) -> None:
        # No (de)serializers: bytes both ways.
        self.infer = self.channel.unary_unary(f"/{INFERENCE_SERVICE}/{METHOD}")


class ThreadedPeers:
    def __init__(self, load: PeerLoad, tls: ClientTls | None = None, proof: MeshProof | None = None) -> None:
        self._load = load
        self._tls = tls
        self._proof = proof
        self._lock = threading.Lock()
        self._channels: dict[str, _Channel] = {}
        self._closed = False

    def infer(self, node: NodeView, data: bytes, entries: Entries, budget_s: float | None) -> bytes:
        """The peer's ModelInferResponse, as bytes, to the serialized request `data`; `entries`: the metadata to
        send (trace context). Raises PeerError, or Overloaded when the peer's copy is at its bound."""
        peer = node.instance_id
        held = self._take(node)
        self._load.started(peer)
        if self._proof is not None:
            entries = (*entries, self._proof.sign(METHOD))
        try:
            response: bytes = held.infer(data, timeout=budget_s, metadata=entries or None)
            return response
        except grpc.RpcError as error:
            assert isinstance(error, grpc.Call)  # what a failed blocking call raises is also its Call
            raise forward_failed(self._load, peer, error) from None
        finally:
            self._load.ended(peer)
            self._let_go(held)

    def _take(self, node: NodeView) -> _Channel:
        with self._lock:
            held = self._channels.get(node.instance_id)
            if held is None or held.endpoint != node.endpoint:  # new, or restarted elsewhere under its id
                if held is not None:
                    self._retire(held)
                held = _Channel(node.endpoint, transport.create_threaded_channel(
                    node.endpoint, self._tls, options=transport.PEER_OPTIONS))
                if self._closed:  # a poller forwarding while the node stops: this call's channel alone
                    held.gone = True
                else:
                    self._channels[node.instance_id] = held
            held.calls += 1
            return held

    def _let_go(self, held: _Channel) -> None:
        with self._lock:
            held.calls -= 1
            if not held.gone or held.calls:
                return
        held.channel.close()

    def _retire(self, held: _Channel) -> None:
        """Under the lock: the channel is closed now, or by its last call's end."""
        held.gone = True
        if not held.calls:
            held.channel.close()

    def forget(self, instance_id: str) -> None:
        """The peer left the mesh: close its channel once the calls still out on it have ended."""
        with self._lock:
            held = self._channels.pop(instance_id, None)
            if held is not None:
                self._retire(held)

    def close(self) -> None:
        """Every channel, now: the node is stopping, and calls still out end CANCELLED, so that the polling
        threads waiting in them are free to end (their own callers' calls ended with the server)."""
        with self._lock:
            self._closed = True
            held, self._channels = list(self._channels.values()), {}
        for channel in held:
            channel.channel.close()
