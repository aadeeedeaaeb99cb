"""Mesh-wide ModelStatistics: this node's counts plus every live peer's own share, asked with the node scope."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2 as triton_pb

from meshnode.errors import ModelNotFound
from meshnode.mesh.statistics import NODE_SCOPE, SCOPE_KEY, MeshStatistics, node_scope
from meshnode.runtimes.base import TensorSpec
from meshnode.serving.statistics import ModelStatistics
from meshpb import pb
from router.errors import PeerError


class Node:
    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id


class Mesh:
    instance_id = "me"

    def nodes(self) -> dict[str, Node]:
        return {name: Node(name) for name in ("me", "a", "b")}


class Peers:
    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str, Any, Any]] = []

    async def ask(self, node: Node, method: str, request: Any, entries: Any, budget_s: float) -> Any:
        self.asked.append((node.instance_id, method, request, entries))
        answer = self.answers[node.instance_id]
        if isinstance(answer, Exception):
            raise answer
        return answer


class Registry:
    def get(self, name: str) -> object | None:
        return object() if name in ("m", "idle") else None


def _ran(stats: ModelStatistics, times: int) -> None:
    request = pb.ModelInferRequest(model_name="m")
    for _ in range(times):
        stats.finished("m", "1", (TensorSpec("x", "FP32", (4,)),), request, 0.0, 0.0, 0.001, ok=True)


def _share(count: int) -> Any:
    stats = ModelStatistics()
    _ran(stats, count)
    return triton_pb.ModelStatisticsResponse(model_stats=stats.report())


def _statistics(peers: Peers, local: ModelStatistics) -> MeshStatistics:
    return MeshStatistics(local=local, mesh=Mesh(), peers=peers, registry=Registry(),  # type: ignore[arg-type]
                          alias_targets={"alias": "m"})


async def test_the_mesh_answers_the_sum_of_every_nodes_share() -> None:
    local = ModelStatistics()
    _ran(local, 2)
    peers = Peers({"a": _share(3), "b": _share(4)})
    (stats,) = await _statistics(peers, local).report("alias")
    assert stats.name == "m" and stats.inference_stats.success.count == 9
    assert sorted(node for node, *_ in peers.asked) == ["a", "b"]
    assert all(method == "ModelStatistics" and request.name == "m" and entries == ((SCOPE_KEY, NODE_SCOPE),)
               for _, method, request, entries in peers.asked)


async def test_the_node_scope_answers_this_node_alone_and_a_silent_peer_leaves_its_share_out() -> None:
    local = ModelStatistics()
    _ran(local, 2)
    peers = Peers({"a": PeerError(grpc.StatusCode.UNAVAILABLE, "gone", retry_elsewhere=True), "b": _share(1)})
    statistics = _statistics(peers, local)
    assert (await statistics.report("m", node_only=True))[0].inference_stats.success.count == 2 and not peers.asked
    assert (await statistics.report("m"))[0].inference_stats.success.count == 3


async def test_a_model_that_never_ran_answers_zeros_and_an_unknown_one_is_not_found() -> None:
    statistics = _statistics(Peers({"a": _share(0), "b": _share(0)}), ModelStatistics())
    (idle,) = await statistics.report("idle", "2")
    assert (idle.name, idle.version, idle.inference_stats.success.count) == ("idle", "2", 0)
    assert await statistics.report("idle", node_only=True) == []
    with pytest.raises(ModelNotFound):
        await statistics.report("nope")


def test_the_scope_is_read_from_metadata() -> None:
    assert node_scope([("meshserve-scope", "node")]) and node_scope([("meshserve-scope", b"node")])
    assert not node_scope([("meshserve-scope", "mesh")]) and not node_scope(None)
