"""Fakes of the router's ports (this node, the mesh view, peers) and a small world built of them."""


from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import grpc

from placement.types import LOADED, LOADING, CopyView, FailureView, ModelView, NodeView
from router.errors import MeshError, Overloaded, PeerError
from router.hop import Hop
from router.router import Router

GB = 1 << 30
ME = "me"
MODEL = "resnet50"
NOW = 1_000_000.0
TRACE = (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), ("tracestate", "vendor=x"))
CLIENT = Hop(propagated=TRACE)  # what a client request carries: no hops, mode ANY, its trace context


@dataclass(frozen=True)
class Req:
    model_name: str = MODEL
    model_version: str = ""


class ModelNotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND


class LoadFailed(MeshError):
    code = grpc.StatusCode.UNAVAILABLE
    retry_elsewhere = True


def unavailable(node: str, why: str = "connection refused") -> PeerError:
    return PeerError(grpc.StatusCode.UNAVAILABLE, f"node {node}: {why}", retry_elsewhere=True)


def overloaded(node: str, waiting: int = 32) -> Overloaded:
    """What a copy at its bound answers (as meshnode.net.peers maps a peer's answer back)."""
    return Overloaded(f"node {node}: model '{MODEL}' has {waiting} requests waiting on node {node}, its limit")


# -- fakes ------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeLocal:
    def __init__(self, instance_id: str = ME) -> None:
        self.instance_id = instance_id
        self.copies: set[tuple[str, str]] = set()
        self.calls: list[Any] = []
        self.guards: list[bool] = []  # churn_guard of each call
        self.errors: list[MeshError] = []  # raised by the next infer calls, in order

    def has_copy(self, name: str, version: str) -> bool:
        return (name, version) in self.copies

    async def infer(self, request: Any, churn_guard: bool = False) -> Any:
        self.calls.append(request)
        self.guards.append(churn_guard)
        if self.errors:
            raise self.errors.pop(0)
        return ("served", self.instance_id)


class FakeMesh:
    def __init__(self, nodes: Iterable[NodeView], clock: FakeClock) -> None:
        self.models: dict[str, ModelView] = {}
        self.live: dict[str, NodeView] = {n.instance_id: n for n in nodes}
        self.claims: list[tuple[str, str, frozenset[str]]] = []
        self.claimed_first: str | None = None  # another router's claim lands between our read and our claim
        self.check_liveness = True  # False: a claim that trusts a stale record
        self._clock = clock

    def model(self, name: str) -> ModelView | None:
        return self.models.get(name)

    def nodes(self) -> Mapping[str, NodeView]:
        return self.live

    async def claim_load(self, name: str, target: str, exclude: frozenset[str]) -> str:
        """The compare-and-set of meshnode.mesh.MeshState.claim_load, in memory."""
        self.claims.append((name, target, exclude))
        model = self.models.get(name)
        if model is None:
            return target
        if self.claimed_first is not None:
            model = replace(model, copies=(*model.copies, CopyView(self.claimed_first, LOADING, self._clock())))
            self.models[name], self.claimed_first = model, None
        for copy in model.copies:
            if (copy.instance_id in self.live or not self.check_liveness) and copy.instance_id not in exclude:
                return copy.instance_id
        copies = tuple(c for c in model.copies if c.instance_id in self.live)
        self.models[name] = replace(model, copies=(*copies, CopyView(target, LOADING, self._clock())))
        return target


@dataclass(frozen=True)
class Call:
    node: str
    hop: Hop
    budget_s: float | None


class FakePeers:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.script: dict[str, list[Any]] = {}  # per node: outcomes in order (an exception is raised), last repeats
        self.delay_s = 0.0
        self.counts: dict[str, int] = {}
        self.suspected: set[str] = set()

    def outstanding(self) -> Mapping[str, int]:
        return self.counts

    def suspects(self) -> frozenset[str]:
        return frozenset(self.suspected)

    async def infer(self, node: NodeView, request: Any, hop: Hop, budget_s: float | None) -> Any:
        self.calls.append(Call(node.instance_id, hop, budget_s))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        outcomes = self.script.get(node.instance_id, [])
        outcome = (outcomes.pop(0) if len(outcomes) > 1 else outcomes[0]) if outcomes else ("served", node.instance_id)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def fail(self, nodes: Iterable[str], why: str = "connection refused") -> None:
        for n in nodes:
            self.script[n] = [unavailable(n, why)]

    @property
    def nodes_called(self) -> list[str]:
        return [c.node for c in self.calls]


def node(iid: str, *, free: int = 10 * GB, cap: int = 10 * GB, **kw: Any) -> NodeView:
    return NodeView(instance_id=iid, endpoint=f"{iid}:8033", capacity_bytes=cap, used_bytes=cap - free, **kw)


def small(iid: str) -> NodeView:
    """A node too small for the (1 GB) model: placement never loads it there."""
    return node(iid, free=GB // 2, cap=GB // 2)


def loaded(iid: str, since: float = NOW - 100) -> CopyView:
    return CopyView(iid, LOADED, since)


class World:
    def __init__(self, nodes: Iterable[NodeView], *, copies: Iterable[CopyView] = (), size: int = GB,
                 failures: Iterable[FailureView] = (), registered: bool = True, **router_kw: Any) -> None:
        self.clock = FakeClock()
        self.local = FakeLocal()
        self.mesh = FakeMesh(nodes, self.clock)
        self.peers = FakePeers()
        if registered:
            self.mesh.models[MODEL] = ModelView(MODEL, size, copies=tuple(copies), failures=tuple(failures))
        self.router = Router(self.local, self.mesh, self.peers, rng=random.Random(1234), clock=self.clock,
                             **router_kw)

    async def route(self, hop: Hop = CLIENT, budget_s: float | None = 30.0) -> Any:
        return await self.router.route(Req(), hop, budget_s)

    def copy_states(self) -> dict[str, str]:
        return {c.instance_id: c.state for c in self.mesh.models[MODEL].copies}


