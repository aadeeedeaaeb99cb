"""ModelStatistics for the whole mesh: this node's counts (serving.statistics) summed with every live peer's.

Each node counts only what its runtime ran, so the sum counts every request once, whichever nodes it
entered and ran on. A peer is asked for its own counts with the metadata `meshserve-scope: node`, which
a client may send too, to see one node's share.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from tritonclient.grpc import service_pb2 as triton_pb

from meshnode.errors import ModelNotFound
from meshnode.mesh.state import MeshState
from meshnode.net.peers import GrpcPeers
from meshnode.serving.statistics import ModelStatistics, merge
from meshnode.state.registry import Registry
from router.errors import MeshError

log = logging.getLogger(__name__)

SCOPE_KEY = "meshserve-scope"
NODE_SCOPE = "node"
PEER_BUDGET_S = 5.0


class MeshStatistics:
    def __init__(self, *, local: ModelStatistics, mesh: MeshState, peers: GrpcPeers, registry: Registry,
                 alias_targets: Mapping[str, str]) -> None:
        self._local = local
        self._mesh = mesh
        self._peers = peers
        self._registry = registry
        self._alias_targets = alias_targets

    async def report(self, name: str = "", version: str = "", node_only: bool = False) -> list[Any]:
        """Triton's ModelStatistics per model and version (every model when `name` is ""), summed over the
        mesh unless `node_only`. A registered model that never ran in the mesh answers zeros, as Triton's."""
        if name:
            name = self._alias_targets.get(name, name)
            if self._registry.get(name) is None:
                raise ModelNotFound.unknown(name)
        reports = [self._local.report(name, version)]
        if not node_only:
            reports += await self._from_peers(name, version)
        merged = merge(reports)
        if name and not merged and not node_only:  # a node's own share leaves it out: the sum stays one entry
            return [_zero(name, version)]
        return merged

    async def _from_peers(self, name: str, version: str) -> list[list[Any]]:
        request = triton_pb.ModelStatisticsRequest(name=name, version=version)
        peers = [node for node in self._mesh.nodes().values() if node.instance_id != self._mesh.instance_id]

        async def ask(node: Any) -> list[Any]:
            try:
                response = await self._peers.ask(node, "ModelStatistics", request, ((SCOPE_KEY, NODE_SCOPE),),
                                                 PEER_BUDGET_S)
            except MeshError as error:
                # A node that cannot answer now (leaving, overloaded) leaves its share out rather than failing all.
                log.warning("model statistics without node %s's share: %s", node.instance_id, error)
                return []
            return list(response.model_stats)

        return list(await asyncio.gather(*(ask(node) for node in peers)))


def _zero(name: str, version: str) -> Any:
    return triton_pb.ModelStatistics(name=name, version=version)


def node_scope(metadata: Any) -> bool:
    """Does the call's metadata restrict statistics to the answering node?"""
    return any(key == SCOPE_KEY and (value if isinstance(value, str) else value.decode()) == NODE_SCOPE
               for key, value in metadata or ())
