"""The drain's hand-off over the real cache and mesh state (fake etcd), with fake peers and a manual clock."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from meshnode.mesh.drain import RECENT_S, hand_off, models_to_hand_off
from meshnode.state.registry import Copy
from placement.types import LOADED, LOADING, NodeView
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import ME, NOW, NodeParts, node_view, peer_error

pytestmark = pytest.mark.timeout(10)

Make = Callable[..., Awaitable[NodeParts]]
LEAVING = node_view(ME, shutting_down=True)  # this node, draining


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    made: list[NodeParts] = []

    async def build(*views: NodeView) -> NodeParts:
        store = FakeStore()
        store.publish(LEAVING, *views)
        made.append(await NodeParts(store, tmp_path / f"repo{len(made)}").start())
        return made[-1]

    yield build
    for parts in made:
        await parts.stop()


async def used_at(node: NodeParts, name: str, when: float, *, versions: tuple[str, ...] = ("1",),
                  elsewhere: dict[str, str] | None = None) -> None:
    """A model loaded here and last used at `when`, with copies on other nodes (node -> state) in its record."""
    await node.register(name, versions=versions)
    node.clock.now = when
    for version in versions:
        await node.use(name, version)
    node.clock.now = NOW
    others = {n: Copy(state=state, since=NOW) for n, state in (elsewhere or {}).items()}
    await node.registry.update(name, lambda r: replace(r, copies={**r.copies, **others}) if r else None)


async def hand_off_now(node: NodeParts) -> tuple[int, int]:
    return await hand_off(node.cache, node.mesh, node.peers.grpc, rng=random.Random(3), clock=node.clock)


# -- what to hand off ---------------------------------------------------------------------------------


async def test_only_recently_used_models_held_nowhere_else_that_stays_are_handed_off(make: Make) -> None:
    node = await make(node_view("n2"), node_view("n3", shutting_down=True))
    await used_at(node, "idle-for-long", NOW - RECENT_S - 100)
    await used_at(node, "only-here", NOW - 40)
    await used_at(node, "loaded-on-n2", NOW - 30, elsewhere={"n2": LOADED})
    await used_at(node, "loading-on-n2", NOW - 20, elsewhere={"n2": LOADING})
    await used_at(node, "loaded-on-leaving-n3", NOW - 10, elsewhere={"n3": LOADED})
    await used_at(node, "unregistered", NOW - 5)
    await node.registry.delete("unregistered")
    # Most recently used first: with the drain's time bounded, the likeliest next requests move first.
    assert models_to_hand_off(node.cache, node.mesh, NOW) == ["loaded-on-leaving-n3", "loading-on-n2", "only-here"]


async def test_a_model_with_two_versions_loaded_here_is_handed_off_once(make: Make) -> None:
    node = await make(node_view("n2"))
    await used_at(node, "multi", NOW - 10, versions=("1", "2"))
    assert [e.key for e in node.cache.loaded_entries()] == ["multi@1", "multi@2"]
    assert models_to_hand_off(node.cache, node.mesh, NOW) == ["multi"]


# -- handing off ----------------------------------------------------------------------------------------------


async def test_a_model_only_here_is_loaded_on_the_node_placement_chooses(make: Make) -> None:
    node = await make(node_view("n2"), node_view("n3", used=5_000))  # n2 has the most free space
    await used_at(node, "a", NOW - 10)
    assert await hand_off_now(node) == (1, 0)
    assert node.peers.loads == [("n2", "a")]


async def test_a_failed_hand_off_is_retried_on_another_node(make: Make) -> None:
    node = await make(node_view("n2"), node_view("n3", used=5_000))
    await used_at(node, "a", NOW - 10)
    node.peers.load_errors["n2"] = [peer_error("n2", "disk full")]
    assert await hand_off_now(node) == (1, 0)
    assert node.peers.loads == [("n2", "a"), ("n3", "a")]


async def test_a_hand_off_tries_three_nodes_at_most(make: Make) -> None:
    frees = {"n2": 10_000, "n3": 7_000, "n4": 5_000, "n5": 3_000}  # each clearly ahead of the next
    node = await make(*(node_view(n, used=10_000 - free) for n, free in frees.items()))
    await used_at(node, "a", NOW - 10)
    for name in frees:
        node.peers.load_errors[name] = [peer_error(name, "out of memory")]
    assert await hand_off_now(node) == (0, 1)
    assert node.peers.loads == [("n2", "a"), ("n3", "a"), ("n4", "a")]


async def test_a_model_no_node_can_take_is_counted_as_failed(make: Make) -> None:
    node = await make(node_view("n2", shutting_down=True), node_view("n3", capacity=50))
    await used_at(node, "a", NOW - 10)
    assert await hand_off_now(node) == (0, 1)
    assert node.peers.loads == []


async def test_several_models_are_handed_off_and_each_is_counted(make: Make) -> None:
    node = await make(node_view("n2"), node_view("n3", used=5_000))
    await used_at(node, "a", NOW - 10)
    await used_at(node, "b", NOW - 5)

    async def b_fails_everywhere(instance_id: str, name: str) -> None:
        if name == "b":
            raise peer_error(instance_id, "model 'b' is corrupt")

    node.peers.on_load = b_fails_everywhere
    assert await hand_off_now(node) == (1, 1)
    assert sorted(node.peers.loads) == [("n2", "a"), ("n2", "b"), ("n3", "b")]


async def test_nothing_to_hand_off_calls_no_peer(make: Make) -> None:
    node = await make(node_view("n2"))
    await used_at(node, "a", NOW - 10, elsewhere={"n2": LOADED})
    assert await hand_off_now(node) == (0, 0)
    assert node.peers.loads == []
