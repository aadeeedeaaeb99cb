"""What the router needs from the node it runs in, from the mesh's state, and from its peers.

The node implements these over its cache, its etcd view and gRPC channels; unit tests use fakes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from placement.types import ModelView, NodeView
from router.hop import Hop


class InferRequest(Protocol):
    @property
    def model_name(self) -> str: ...
    @property
    def model_version(self) -> str: ...


class LocalNode(Protocol):
    @property
    def instance_id(self) -> str: ...

    def has_copy(self, name: str, version: str) -> bool:
        """A copy here, loaded or loading: a request would be served without a new load."""
        ...

    async def infer(self, request: Any, churn_guard: bool = False) -> Any:
        """Serve here, loading the model if needed; raises MeshError subclasses (Overloaded when too many
        requests wait for the copy here already).

        With churn_guard, refuse (retry_elsewhere) a load that would evict recently used models.
        """
        ...


class MeshView(Protocol):
    def model(self, name: str) -> ModelView | None:
        """The model's shared record, or None if it is not registered."""
        ...

    def nodes(self) -> Mapping[str, NodeView]:
        """Live nodes (a node whose lease expired is already gone), this one included."""
        ...

    async def claim_load(self, name: str, target: str, exclude: frozenset[str]) -> str:
        """Record that `target` loads the model, unless a copy outside `exclude` exists already.

        Returns the node that holds the claim: `target`, or the node that claimed first.
        """
        ...


class Peers(Protocol):
    def outstanding(self) -> Mapping[str, int]:
        """Requests this node has in flight to each peer now."""
        ...

    def suspects(self) -> frozenset[str]:
        """Peers that failed to answer very recently: not chosen until they prove alive."""
        ...

    async def infer(self, node: NodeView, request: Any, hop: Hop, budget_s: float | None) -> Any:
        """Forward; raises router.errors.PeerError, or router.errors.Overloaded when the peer's copy (or the
        peer) is at its bound of waiting requests."""
        ...


class RouteTracer(Protocol):
    def decided(self, model: str, started_ns: int, chosen: str, candidates: int, reason: str) -> None:
        """Record one routing decision, from `started_ns` (time.time_ns) until now: `candidates` copies were
        considered and `chosen` serves the request, because of `reason` (copy, load, claimed)."""
        ...


class Serve(Protocol):
    """Where a routed request goes once the router has chosen: by default this node's infer and the peers'
    forward; a stream's session (meshnode.serving.streams) sends it on its streams instead."""

    async def here(self, request: Any, churn_guard: bool) -> Any:
        """As LocalNode.infer."""
        ...

    async def at(self, node: NodeView, request: Any, hop: Hop, budget_s: float | None) -> Any:
        """As Peers.infer."""
        ...
