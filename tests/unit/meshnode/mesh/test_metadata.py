"""PeerMetadata (the dataplane's metadata from elsewhere) over the real mesh state, with fake peers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshnode.mesh.metadata import PeerMetadata
from meshnode.state.registry import Copy
from meshpb import pb
from placement.types import LOADED, LOADING
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import ME, NOW, NodeParts, node_view, peer_error

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeParts]:
    store = FakeStore()
    store.publish(node_view(ME), node_view("n2"), node_view("n3", shutting_down=True), node_view("n4"),
                  node_view("t1", runtime="triton"))
    parts = await NodeParts(store, tmp_path / "repo").start()
    yield parts
    await parts.stop()


def answer(node: str) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(name="a", platform=f"from {node}")


def ask(node: NodeParts) -> PeerMetadata:
    return PeerMetadata(mesh=node.mesh, registry=node.registry, peers=node.peers.grpc, runtime=node.runtime.name)


async def test_a_loaded_copy_is_asked_before_a_loading_one(node: NodeParts) -> None:
    await node.register("a", copies={"n4": Copy(state=LOADING, since=1.0), "n2": Copy(state=LOADED, since=2.0)})
    node.peers.metadata_answers.update({"n2": answer("n2"), "n4": answer("n4")})
    assert await ask(node)("a", "1") == answer("n2")
    assert node.peers.metadata_calls == [("n2", "a", "1")]


async def test_this_node_leaving_nodes_and_failing_peers_are_passed_over(node: NodeParts) -> None:
    states = {ME: LOADED, "n3": LOADED, "n2": LOADED, "n4": LOADING, "gone": LOADED}  # n3 leaves; gone left
    await node.register("a", copies={n: Copy(state=state, since=NOW) for n, state in states.items()})
    node.peers.metadata_answers.update({"n2": peer_error("n2", "connection reset"), "n4": answer("n4")})
    assert await ask(node)("a", "") == answer("n4")
    assert node.peers.metadata_calls == [("n2", "a", ""), ("n4", "a", "")]


async def test_no_copy_to_ask_is_none_when_this_node_can_load_the_model(node: NodeParts) -> None:
    await node.register("a")
    assert await ask(node)("a", "") is None
    assert await ask(node)("ghost", "") is None
    assert node.peers.metadata_calls == []


async def test_another_runtimes_model_without_a_copy_is_asked_of_a_node_that_can_load_it(node: NodeParts) -> None:
    await node.register("t", runtime="triton")
    node.peers.metadata_answers["t1"] = answer("t1")
    assert await ask(node)("t", "") == answer("t1")
    assert node.peers.metadata_calls == [("t1", "t", "")]
