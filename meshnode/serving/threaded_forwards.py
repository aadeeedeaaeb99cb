"""A client's ModelInfer forwarded from the polling thread that took it, when a peer holds a loaded copy.

Most requests of a mesh are forwarded once. On the threaded server such a request used to cross to the event
loop, be routed and sent by grpc.aio, and cross back: two thread hand-offs and asyncio's per-call cost around one
peer call. Here the polling thread decides the route itself, with the router's own rule (placement's
choose_copy, over the same mesh view, outstanding counts and suspects), and sends the request's bytes, the hop
appended, over a blocking call (net.threaded_peers); the peer's bytes are the answer.

Only the plain case is taken: a client's request (no hop, no sequence) for a model with no copy here, whose
chosen copy is LOADED on a live peer. Anything else is Declined and goes down the loop path (serving.dataplane,
router), which decides it as before: a load, a sequence, a copy here at its bound, a peer's request, a request
out of time. So does a forward whose peer failed in a way another node may not (its copy moved, it is
overloaded, it is gone): the loop's router tries the other copies, that peer counted as tried (TRIED_ALREADY).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

from meshnode.errors import InvalidInput
from meshnode.net.peer_load import PeerLoad
from meshnode.net.threaded_peers import Entries, ThreadedPeers
from meshnode.observability.tracing import Tracing, status_code
from meshnode.runtimes.base import CallerMetadata
from meshnode.serving.cache import ModelCache
from meshnode.serving.dataplane import INFER, DataPlane, TimeRemaining, check_version
from meshnode.serving.threaded_hits import Forwarded, ThreadedHits
from meshpb import pb
from placement.policy import choose_copy
from placement.types import LOADED, NodeView
from router.errors import MeshError
from router.hop import HOP_METADATA, PARAMETER_KEY, Hop, Mode, trace_context
from router.ports import MeshView
from router.sequences import sequence_of


@dataclass(frozen=True, slots=True)
class Declined:
    """Not answered here: the loop path serves the request, skipping the peers in `tried` (they failed it)."""

    tried: tuple[str, ...] = ()


NOT_TAKEN = Declined()


@dataclass(frozen=True, slots=True)
class _Route:
    node: NodeView
    candidates: int  # the model's copies, for the route's span
    started_ns: int


class ThreadedForwards:
    def __init__(self, *, mesh: MeshView, peers: ThreadedPeers, load: PeerLoad, dataplane: DataPlane,
                 cache: ModelCache, alias_targets: Mapping[str, str], hits: ThreadedHits, instance_id: str,
                 rng: random.Random | None = None, tracing: Tracing | None = None) -> None:
        self._mesh = mesh
        self._peers = peers
        self._load = load
        self._plane = dataplane
        self._ready = cache.ready
        self._lock = cache.inflight_lock
        self._alias_targets = alias_targets
        self._hits = hits
        self._me = instance_id
        self._rng = rng or random.Random()
        self._tracing = tracing
        # What the loop's router sends with a client's request to a copy: one hop, tried here, serve it there.
        # A serialized map entry merges into the message it is appended to, so the request is never written again.
        self._hop = Hop().forward(Mode.COPY, (instance_id,))
        self._hop_bytes = pb.ModelInferRequest(
            parameters={PARAMETER_KEY: pb.InferParameter(string_param=self._hop.encode())}).SerializeToString()

    def forward(self, request: pb.ModelInferRequest, data: bytes, metadata: CallerMetadata,
                time_remaining: TimeRemaining) -> bytes | Declined:
        """The peer's answer (a ModelInferResponse's bytes) to `request`, whose bytes are `data`, or Declined: not a
        plain forward, or one another node may still serve, for the loop path. Raises the MeshError of a peer's
        failure that another node would not mend."""
        route = self._route(request, metadata)
        if route is None:
            return NOT_TAKEN
        budget_s = time_remaining()
        if budget_s is not None and budget_s <= 0:
            return NOT_TAKEN  # the loop path says it is out of time, as it would
        plane = self._plane
        with self._lock:
            if plane.inflight >= plane.max_inflight:
                return NOT_TAKEN  # the loop path refuses it, counted
            plane.inflight += 1
        started, code, response = time.perf_counter(), "OK", None
        try:
            response = self._call(request, data, metadata, route, budget_s)
            return response
        except MeshError as error:
            if error.retry_elsewhere:
                code = ""  # the loop path serves it, and counts it
                return Declined((route.node.instance_id,))
            code = status_code(error).name
            raise
        finally:
            with self._lock:
                plane.inflight -= 1
            if code:
                self._hits.done(Forwarded(request.model_name, started, time.perf_counter(), code, len(data),
                                          len(response) if response is not None else None))

    def _route(self, request: pb.ModelInferRequest, metadata: CallerMetadata) -> _Route | None:
        """The peer whose loaded copy serves a client's plain request, as the loop's router would choose it."""
        parameters = request.parameters
        if parameters and (PARAMETER_KEY in parameters or sequence_of(parameters) is not None):
            return None
        if any(key in HOP_METADATA for key, _ in metadata() or ()):
            return None
        name, version = request.model_name, request.model_version
        name = self._alias_targets.get(name, name)  # the peer resolves the alias too, as its own view says
        if (name, version) in self._ready:
            return None  # a copy here declined it (at its bound, a registered timeout): the loop path decides
        try:
            check_version(version)
        except InvalidInput:
            return None  # the loop path refuses it, counted
        started_ns = time.time_ns()
        model = self._mesh.model(name)
        if model is None:
            return None
        nodes = self._mesh.nodes()
        version = version or model.newest_version
        target = choose_copy(model.copies, nodes=nodes, local_outstanding=self._load.outstanding(),
                             exclude=self._load.suspects(), rng=self._rng, version=version)
        if target is None or target == self._me:
            return None
        if not any(c.instance_id == target and c.state == LOADED and (not version or version in c.versions)
                   for c in model.copies):
            return None  # only a copy loading, or one without the version: the loop path waits for it
        node = nodes.get(target)
        return None if node is None else _Route(node, len(model.copies), started_ns)

    def _call(self, request: pb.ModelInferRequest, data: bytes, metadata: CallerMetadata, route: _Route,
              budget_s: float | None) -> bytes:
        sent, node = metadata(), route.node
        if self._tracing is None:
            return self._peers.infer(node, data + self._hop_bytes, trace_context(sent), budget_s)
        tracing = self._tracing
        with tracing.server(INFER, sent) as span:
            if span.is_recording():
                tracing.describe(span, INFER, request.model_name, request.model_version, Hop())
                tracing.routed(Hop())
            tracing.decided(request.model_name, route.started_ns, node.instance_id, route.candidates, "copy")
            with tracing.client(INFER, node.endpoint) as trace:
                entries: Entries = trace
                return self._peers.infer(node, data + self._hop_bytes, entries, budget_s)
