"""Forwarding to peer nodes over gRPC: one channel per peer, outstanding counts, suspects.

A peer that fails to answer (connection refused, reset mid-request) is a suspect for a few
seconds, so concurrent requests stop choosing it before its lease has even expired.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from meshnode import transport
from meshnode.model_control import PARAM_COPY
from meshpb import pb
from placement.types import NodeView
from router.errors import NOT_HERE_PREFIX, RETRY_ELSEWHERE_CODES, PeerError
from router.hop import Hop

SUSPECT_S = 3.0


class GrpcPeers:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._stubs: dict[str, tuple[str, grpc.aio.Channel, transport.InferenceStub]] = {}
        self._outstanding: dict[str, int] = {}
        self._suspect_until: dict[str, float] = {}
        self._now = clock

    def outstanding(self) -> Mapping[str, int]:
        return self._outstanding

    def suspects(self) -> frozenset[str]:
        if not self._suspect_until:
            return frozenset()
        now = self._now()
        for peer in [p for p, until in self._suspect_until.items() if until <= now]:
            del self._suspect_until[peer]
        return frozenset(self._suspect_until)

    def _stub(self, node: NodeView) -> transport.InferenceStub:
        found = self._stubs.get(node.instance_id)
        if found is None or found[0] != node.endpoint:  # new, or restarted elsewhere under its id
            if found is not None:
                asyncio.ensure_future(found[1].close())
            channel = transport.create_channel(node.endpoint)
            found = (node.endpoint, channel, transport.InferenceStub(channel))
            self._stubs[node.instance_id] = found
        return found[2]

    async def infer(self, node: NodeView, request: Any, hop: Hop, budget_s: float | None) -> Any:
        peer = node.instance_id
        self._outstanding[peer] = self._outstanding.get(peer, 0) + 1
        try:
            return await self._stub(node).ModelInfer(request, timeout=budget_s, metadata=hop.to_metadata())
        except grpc.aio.AioRpcError as error:
            code, details = error.code(), error.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE and not details.startswith(NOT_HERE_PREFIX):
                self._suspect_until[peer] = self._now() + SUSPECT_S
            raise PeerError(code, f"node {peer}: {details}", retry_elsewhere=code in RETRY_ELSEWHERE_CODES) from None
        finally:
            self._outstanding[peer] -= 1

    async def load_copy(self, node: NodeView, name: str, budget_s: float) -> None:
        """Ask `node` to load a copy of registered model `name`; raises PeerError."""
        request = pb.RepositoryModelLoadRequest(
            model_name=name, parameters={PARAM_COPY: pb.ModelRepositoryParameter(bool_param=True)})
        try:
            await self._stub(node).RepositoryModelLoad(request, timeout=budget_s)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            raise PeerError(code, f"node {node.instance_id}: {error.details()}",
                            retry_elsewhere=code in RETRY_ELSEWHERE_CODES) from None

    async def forget(self, instance_id: str) -> None:
        """The peer left the mesh: close its channel."""
        self._suspect_until.pop(instance_id, None)
        self._outstanding.pop(instance_id, None)
        found = self._stubs.pop(instance_id, None)
        if found is not None:
            await found[1].close()

    async def close(self) -> None:
        for peer in list(self._stubs):
            await self.forget(peer)
