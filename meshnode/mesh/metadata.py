"""Model metadata from a copy elsewhere in the mesh (serving.dataplane.MetadataElsewhere).

Clients ask for metadata before their first request; answering from an existing copy keeps that
question from loading a copy on every node a client happens to touch.
"""

from __future__ import annotations

import random
import time

from meshnode.mesh.state import MeshState
from meshnode.net.peers import GrpcPeers
from meshnode.state.registry import Registry
from meshpb import pb
from placement.policy import choose_load_target
from placement.types import LOADED
from router.errors import MeshError


class PeerMetadata:
    def __init__(self, *, mesh: MeshState, registry: Registry, peers: GrpcPeers, runtime: str) -> None:
        self._mesh = mesh
        self._registry = registry
        self._peers = peers
        self._runtime = runtime  # this node's: a model for another runtime cannot be loaded here to answer

    async def __call__(self, name: str, version: str) -> pb.ModelMetadataResponse | None:
        view, live = self._mesh.model(name), self._mesh.nodes()
        # Loaded copies first; a loading one answers once its (single) load is done.
        copies = sorted(view.copies, key=lambda c: c.state != LOADED) if view is not None else []
        for copy in copies:
            node = live.get(copy.instance_id)
            if node is None or node.shutting_down or node.instance_id == self._mesh.instance_id:
                continue
            try:
                return await self._peers.metadata(node, name, version)
            except MeshError:
                continue
        record = self._registry.get(name)
        if view is not None and record is not None and not record.runs_on(self._runtime):
            # No copy, and this node cannot load one: a node that can loads it to answer.
            target = choose_load_target(live.values(), size_bytes=view.size_bytes, now=time.time(),
                                        rng=random.Random(), runtime=view.runtime)
            if target is not None:
                return await self._peers.metadata(live[target], name, version)
        return None
