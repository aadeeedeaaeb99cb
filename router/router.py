"""Route one inference request: serve here, forward to a copy, or have the mesh load it.

A loaded copy here is served without entering this module (the node checks its cache first).
Otherwise: the least busy live copy; with none, placement picks where to load and the model
record settles concurrent claims, so one load serves every node's waiting requests. Failures
move on to the next copy or node within the deadline, a bounded number of times, and the last
error names the model and its cause.

Overload: a copy at its bound of waiting requests answers Overloaded at once; the request moves on
to another copy. When every live copy has said so, the request fails with Overloaded naming the
model and those copies, and no load is claimed: more copies are the copy manager's decision, made
from the copies' traffic, not a side effect of one request being turned away.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from placement.policy import (
    PlacementConfig,
    active_failures,
    choose_copy,
    choose_load_target,
    load_exclusions,
    should_give_up,
)
from placement.types import FailureView, ModelView, NodeView
from router.errors import OVERLOADED_PREFIX, GaveUp, MeshError, NoPlacement, NotHere, OutOfTime, Overloaded
from router.hop import MAX_HOPS, Hop, Mode
from router.ports import LocalNode, MeshView, Peers, RouteTracer, Serve
from router.sequences import SequenceFlags, SequenceLost, rank

MAX_ATTEMPTS = 6


class Router:
    def __init__(
        self, local: LocalNode, mesh: MeshView, peers: Peers, *, rng: random.Random | None = None,
        clock: Callable[[], float] = time.time, placement: PlacementConfig | None = None,
        max_attempts: int = MAX_ATTEMPTS, tracer: RouteTracer | None = None,
    ) -> None:
        self._local = local
        self._mesh = mesh
        self._peers = peers
        self._rng = rng or random.Random()
        self._now = clock
        self._placement = placement or PlacementConfig()
        self._max_attempts = max_attempts
        self._tracer = tracer
        self._unary = _Unary(local, peers)

    async def route(self, request: Any, hop: Hop, budget_s: float | None,
                    overloaded_here: Overloaded | None = None, serve: Serve | None = None,
                    sequence: SequenceFlags | None = None) -> Any:
        """Serve `request` somewhere in the mesh within `budget_s` seconds (None: no deadline).

        `overloaded_here`: this node's copy refused the request at its bound (the node's hit path). A client's
        request then tries the other copies; one a peer sent for this copy goes back to that peer.
        `serve`: where the chosen node's request goes (a stream's); by default this node's infer or a forward.
        `sequence`: the request's sequence (router.sequences), whose copy serves it.
        """
        name = request.model_name
        serve = serve or self._unary
        if hop.mode is not Mode.ANY or hop.hops >= MAX_HOPS:
            if overloaded_here is not None:
                raise overloaded_here
            return await self._serve_as_chosen(request, hop, serve)
        deadline = None if budget_s is None else time.monotonic() + budget_s
        if sequence is not None:
            holders = self._sequence_holders(name, sequence)
            if holders or not sequence.start:
                return await self._route_sequence(request, hop, sequence, holders, deadline, serve)
            # No copy yet: the start loads one as any request would, and the copy it makes holds the sequence.
        me = self._local.instance_id
        tried: set[str] = set(hop.tried)
        overloaded: set[str] = set()  # nodes whose copy refused this request at its bound
        last_error: MeshError | None = None
        if overloaded_here is not None:
            tried.add(me)
            overloaded.add(me)
            last_error = overloaded_here
        for _ in range(self._max_attempts):
            started_ns = time.time_ns()
            if deadline is not None and time.monotonic() >= deadline:
                break  # checked before a claim too: no load is claimed for a request that cannot wait for it
            model = self._mesh.model(name)
            if model is None:
                if overloaded:  # a copy said so, whatever the view says now: never past its bound
                    raise _overloaded(name, overloaded, last_error)
                return await serve.here(request, False)  # unknown here too: the node says NOT_FOUND
            nodes = self._mesh.nodes()
            unavailable = tried | self._peers.suspects()
            target = choose_copy(model.copies, nodes=nodes, local_outstanding=self._peers.outstanding(),
                                 exclude=unavailable, rng=self._rng,
                                 version=request.model_version or model.newest_version)
            mode, guard, why = Mode.COPY, False, "copy"
            if target is None:
                if overloaded and _every_copy_in(model, nodes, overloaded):
                    # Copies exist and are busy: a load would not be for a miss. (An overloaded node the view
                    # does not list yet holds a copy too: it would have answered NOT_HERE or loaded.)
                    raise _overloaded(name, overloaded, last_error)
                now = self._now()
                reason = should_give_up(model, sorted(tried), now, self._placement)
                if reason is not None:
                    raise GaveUp(reason if last_error is None else f"{reason}; last error: {last_error}")
                excluded = frozenset(unavailable | load_exclusions(model, now, self._placement))
                target = choose_load_target(nodes.values(), size_bytes=model.size_bytes, now=now, rng=self._rng,
                                            exclude=excluded, config=self._placement, runtime=model.runtime)
                if target is None:
                    largest = max((n.capacity_bytes for n in nodes.values()), default=0)
                    raise _no_placement(model, largest, last_error, active_failures(model, now, self._placement))
                # The churn guard protects a node's hot set only while another node could load instead.
                guard = choose_load_target(nodes.values(), size_bytes=model.size_bytes, now=now, rng=self._rng,
                                           exclude=excluded | {target}, config=self._placement,
                                           runtime=model.runtime) is not None
                holder = await self._mesh.claim_load(name, target, excluded)
                mode = (Mode.LOAD if guard else Mode.LOAD_LAST) if holder == target else Mode.COPY
                # "claimed": another request's claim (on `holder`) was there first.
                why = "load" if holder == target else "claimed"
                target = holder
            if self._tracer is not None:
                self._tracer.decided(name, started_ns, target, len(model.copies), why)
            try:
                if target == me:
                    return await serve.here(request, guard and mode is Mode.LOAD)
                node = nodes.get(target)
                if node is None:
                    raise NotHere(f"node {target} left the mesh")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                return await serve.at(node, request, hop.forward(mode, sorted(tried | {me})), remaining)
            except MeshError as error:
                if not error.retry_elsewhere:
                    raise
                tried.add(target)
                if isinstance(error, Overloaded):
                    overloaded.add(target)
                last_error = error
        detail = f"; last error: {last_error}" if last_error else ""
        if deadline is not None and time.monotonic() >= deadline:
            raise OutOfTime(f"model '{name}' could not be served within its {budget_s}s deadline by nodes "
                            f"{sorted(tried) or '(none)'}{detail}")
        if overloaded and overloaded >= tried - set(hop.tried):  # every node tried was at its bound
            raise _overloaded(name, overloaded, last_error)
        raise GaveUp(f"model '{name}' could not be served by nodes {sorted(tried) or '(none)'}{detail}")

    def _sequence_holders(self, name: str, sequence: SequenceFlags) -> list[str]:
        """The model's copies that may hold (or, for a start, take) the sequence, in the order to try them."""
        model = self._mesh.model(name)
        if model is None:
            return []
        nodes = self._mesh.nodes()
        return rank(sequence, [c.instance_id for c in model.copies if c.instance_id in nodes
                               and not (sequence.start and nodes[c.instance_id].shutting_down)])

    async def _route_sequence(self, request: Any, hop: Hop, sequence: SequenceFlags, holders: list[str],
                              deadline: float | None, serve: Serve) -> Any:
        """The sequence's copy serves it: the first in rendezvous order that holds it (a start: the first)."""
        name, me = request.model_name, self._local.instance_id
        if self._mesh.model(name) is None:
            return await serve.here(request, False)  # unknown here too: the node says NOT_FOUND
        tried: set[str] = set(hop.tried)
        last_error: MeshError | None = None
        for target in holders:
            if target in tried:
                continue
            try:
                if target == me:
                    return await serve.here(request, False)
                node = self._mesh.nodes().get(target)
                if node is None:
                    raise NotHere(f"node {target} left the mesh")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise OutOfTime(f"model '{name}' could not be served within its deadline by nodes "
                                    f"{sorted(tried) or '(none)'}")
                return await serve.at(node, request, hop.forward(Mode.COPY, sorted(tried | {me})), remaining)
            except MeshError as error:
                # A copy at its bound holds the sequence all the same: the client hears it is busy.
                if not error.retry_elsewhere or (isinstance(error, Overloaded) and not sequence.start):
                    raise
                tried.add(target)
                last_error = error
        if sequence.start:
            raise GaveUp(f"model '{name}' could not start sequence {sequence} on nodes {sorted(tried) or '(none)'}"
                         + (f"; last error: {last_error}" if last_error else ""))
        raise SequenceLost(sequence, name)

    async def _serve_as_chosen(self, request: Any, hop: Hop, serve: Serve) -> Any:
        """A peer sent this here: serve it, never forward it again (hops stay bounded)."""
        name, version = request.model_name, request.model_version
        if hop.mode is Mode.COPY and not self._local.has_copy(name, version) and not self._claimed_here(name):
            raise NotHere(f"model '{name}' is not loaded on node {self._local.instance_id}")
        return await serve.here(request, hop.mode is Mode.LOAD)

    def _claimed_here(self, name: str) -> bool:
        # A claim for this node can arrive in the view just after the request that it announced.
        model = self._mesh.model(name)
        me = self._local.instance_id
        return model is not None and any(c.instance_id == me for c in model.copies)


class _Unary:
    """A unary request's way: this node's infer, or a forward to the chosen peer."""

    def __init__(self, local: LocalNode, peers: Peers) -> None:
        self.here = local.infer
        self.at = peers.infer


def _every_copy_in(model: ModelView, nodes: Mapping[str, NodeView], overloaded: Collection[str]) -> bool:
    """Is every copy the router could choose (on a live node that is not shutting down) in `overloaded`?"""
    for copy in model.copies:
        node = nodes.get(copy.instance_id)
        if node is not None and not node.shutting_down and copy.instance_id not in overloaded:
            return False
    return True


def _overloaded(name: str, nodes: Collection[str], last_error: MeshError | None) -> Overloaded:
    last = str(last_error).removeprefix(OVERLOADED_PREFIX) if last_error is not None else ""
    detail = f" ({last})" if last else ""
    return Overloaded(f"model '{name}': every copy ({', '.join(sorted(nodes))}) is at its limit of waiting "
                      f"requests{detail}")


def _no_placement(model: ModelView, largest_capacity: int, last_error: MeshError | None,
                  failures: Sequence[FailureView]) -> MeshError:
    name, size_bytes = model.name, model.size_bytes
    if last_error is not None:
        return GaveUp(f"model '{name}' could not be served: {last_error}")
    if failures:  # the nodes that could take it are the ones where it failed recently
        last = max(failures, key=lambda f: f.at)
        return GaveUp(f"model '{name}' failed to load on {last.instance_id}: {last.message}")
    if size_bytes > largest_capacity:
        return NoPlacement(f"model '{name}' needs about {size_bytes} bytes, more than the whole capacity of "
                           f"any node in the mesh (largest: {largest_capacity} bytes)")
    return NoPlacement(f"no node in the mesh has room for model '{name}' ({size_bytes} bytes) now: "
                       "every node is shutting down, excluded, or holds only models in use")
