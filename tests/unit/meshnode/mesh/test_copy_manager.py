"""CopyManager over the real mesh state, cache and registry (fake etcd), with fake peers and a manual clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from meshnode.state.registry import Copy, Failure, ModelRecord
from placement.types import LOADED, LOADING, NodeView
from router.errors import MeshError
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import ME, NOW, NodeParts, copy_state, node_view, peer_error

pytestmark = pytest.mark.timeout(10)

Make = Callable[..., Awaitable[NodeParts]]
COOLED_S = 21 * 60.0  # past CopyConfig.cool_after_s: a copy idle this long may go


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    made: list[NodeParts] = []

    async def build(*views: NodeView) -> NodeParts:
        store = FakeStore()
        store.publish(*(views or (node_view(ME), node_view("n2"), node_view("n3"))))
        made.append(await NodeParts(store, tmp_path / f"repo{len(made)}").start())
        return made[-1]

    yield build
    for parts in made:
        await parts.stop()


async def held_here(node: NodeParts, name: str, **fields: Any) -> ModelRecord:
    """A registered model loaded here, once the record says so."""
    await node.register(name, **fields)
    await node.use(name)
    return await node.recorded(name, lambda r: copy_state(r, ME) == LOADED)


async def add_copy(node: NodeParts, name: str, instance_id: str, state: str = LOADED) -> None:
    copy = Copy(state=state, since=NOW)
    await node.registry.update(name, lambda r: replace(r, copies={**r.copies, instance_id: copy}) if r else None)


# -- adding copies --------------------------------------------------------------------------------------
RESOURCE_EXHAUSTED, NOT_FOUND = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND


def said(added: tuple[int, list[MeshError]]) -> tuple[int, list[tuple[grpc.StatusCode, str]]]:
    """add_copies' answer as (loaded, [(status, message) of each copy that did not load])."""
    return added[0], [(error.code, str(error)) for error in added[1]]



async def test_add_copies_claims_copies_on_nodes_placement_chooses_then_has_them_loaded(make: Make) -> None:
    node = await make()
    await held_here(node, "a")
    assert await node.copies.add_copies("a", 2, budget_s=5.0) == (2, [])
    assert sorted(node.peers.loads) == [("n2", "a"), ("n3", "a")]
    assert node.record("a").copies == {ME: Copy(state=LOADED, since=NOW, versions=["1"]),
                                       "n2": Copy(state=LOADING, since=NOW), "n3": Copy(state=LOADING, since=NOW)}


async def test_holders_adding_at_once_converge_on_the_wanted_count(make: Make) -> None:
    node = await make(node_view(ME), node_view("n2"), node_view("n3", used=10_000))  # placement picks n2
    await held_here(node, "a")
    record = node.record("a")
    claimed_elsewhere = replace(record, copies={**record.copies, "n3": Copy(state=LOADING, since=NOW)})
    # Another holder's claim (on n3) lands between this node's read of the record and its own claim (on n2).
    node.store.interleave("models/a", lambda: node.store.put("models/a", claimed_elsewhere.to_json()))
    assert await node.copies.add_copies("a", 1) == (0, [])
    assert node.peers.loads == [] and set(node.record("a").copies) == {ME, "n3"}


async def test_add_copies_says_why_when_no_node_can_take_a_copy(make: Make) -> None:
    node = await make(node_view(ME), node_view("n2", shutting_down=True))
    await held_here(node, "a")
    assert said(await node.copies.add_copies("a", 1)) == (0, [(RESOURCE_EXHAUSTED, "no node to place a copy on")])
    assert said(await node.copies.add_copies("ghost", 1)) == (0, [(NOT_FOUND, "model 'ghost' is not registered")])
    assert node.peers.loads == []


async def test_add_copies_names_the_recent_failures_that_exclude_nodes(make: Make) -> None:
    node = await make(node_view(ME), node_view("n2"))
    await held_here(node, "a", failures={"n2": Failure(at=NOW - 10.0, message="CUDA out of memory")})
    assert said(await node.copies.add_copies("a", 1)) == (0, [(RESOURCE_EXHAUSTED, "no node to place a copy on (failed "
                                                               "recently on n2: CUDA out of memory)")])


async def test_add_copies_reports_a_peer_that_failed_to_load(make: Make) -> None:
    node = await make(node_view(ME), node_view("n2"))
    await held_here(node, "a")
    node.peers.load_errors["n2"] = [peer_error("n2", "disk full", NOT_FOUND)]
    assert said(await node.copies.add_copies("a", 1)) == (0, [(NOT_FOUND, "n2: node n2: disk full")])  # the peer's
    assert node.peers.loads == [("n2", "a")]


async def test_a_hot_model_gets_another_copy(make: Make) -> None:
    node = await make()
    await held_here(node, "a")
    await node.copies.step()  # counts what the copy here served so far
    await node.use("a", times=100)
    node.clock.advance(1.0)
    await node.copies.step()  # 100 requests/s: more than one copy serves (2000/min); 2 of 3 nodes at most
    await node.peers.loads.wait_len(1)
    assert len(node.peers.loads) == 1 and node.peers.loads[0] in (("n2", "a"), ("n3", "a"))
    record = node.record("a")
    assert len(record.copies) == 2 and record.copies[node.peers.loads[0][0]]["state"] == LOADING


async def test_a_model_below_its_min_copies_gets_more(make: Make) -> None:
    node = await make()
    await held_here(node, "a", min_copies=3)
    await node.copies.step()
    await node.peers.loads.wait_len(2)
    assert sorted(node.peers.loads) == [("n2", "a"), ("n3", "a")]


async def test_a_cool_model_with_one_copy_gets_nothing(make: Make) -> None:
    node = await make()
    await held_here(node, "a")
    await node.copies.step()
    node.clock.advance(1.0)
    await node.copies.step()
    await node.store.settle()
    assert node.peers.loads == [] and set(node.record("a").copies) == {ME}


# -- removing a copy here ----------------------------------------------------------------------------------
# The copy manager gives no signal when a round's work is done; a test waits for the readiness probe, which is
# the removal's last await before its compare-and-set, and which answers synchronously from the fake peers.


async def test_a_cooled_extra_copy_goes_once_another_loaded_copy_answered_ready(make: Make) -> None:
    node = await make()
    await held_here(node, "a")
    await add_copy(node, "a", "n2")
    node.clock.advance(COOLED_S)
    await node.copies.step()
    await node.peers.ready_calls.wait_len(1)
    assert node.peers.ready_calls == ["n2"]
    record = await node.recorded("a", lambda r: ME not in r.copies)
    assert record.copies == {"n2": Copy(state=LOADED, since=NOW)}
    await node.runtime.unloads.wait_len(1)
    assert node.runtime.unloads == ["a@1"] and not node.cache.has_entry("a", "")


async def test_a_cooled_extra_copy_stays_while_no_other_copy_answers_ready(make: Make) -> None:
    node = await make()
    await held_here(node, "a")
    await add_copy(node, "a", "n2")
    node.peers.ready_answers["n2"] = False
    node.clock.advance(COOLED_S)
    await node.copies.step()
    await node.peers.ready_calls.wait_len(1)
    assert ME in node.record("a").copies and node.cache.has_entry("a", "")


async def test_a_cooled_extra_copy_stays_when_the_other_copy_went_before_the_release(make: Make) -> None:
    node = await make()
    await held_here(node, "a")
    await add_copy(node, "a", "n2")

    async def evicted_on_n2(instance_id: str) -> None:  # n2 evicts its copy while it answers the probe
        await node.registry.update("a", lambda r: replace(r, copies={ME: r.copies[ME]}) if r else None)

    node.peers.on_ready = evicted_on_n2
    node.clock.advance(COOLED_S)
    await node.copies.step()
    await node.peers.ready_calls.wait_len(1)
    assert set(node.record("a").copies) == {ME} and node.cache.has_entry("a", "")


async def test_a_cooled_extra_copy_holding_an_open_sequence_stays(make: Make) -> None:
    node = await make()
    await held_here(node, "a")
    await add_copy(node, "a", "n2")
    node.clock.advance(COOLED_S)
    [entry] = node.cache.entries("a")
    entry.sequences_until = node.clock() + 1.0  # a sequence open here, idle for less than its limit
    await node.copies.step()
    await node.store.settle()
    assert node.peers.ready_calls == [] and ME in node.record("a").copies and node.cache.has_entry("a", "")


async def test_a_loading_copy_elsewhere_is_not_enough_to_remove_a_copy(make: Make) -> None:
    node = await make()
    await held_here(node, "a")
    await add_copy(node, "a", "n2", state=LOADING)
    node.clock.advance(COOLED_S)
    await node.copies.step()
    await node.store.settle()
    assert node.peers.ready_calls == [] and ME in node.record("a").copies and node.cache.has_entry("a", "")


# -- proactive loads ------------------------------------------------------------------------------------------


async def test_a_registered_model_without_a_copy_is_loaded_into_free_space_here(make: Make) -> None:
    node = await make(node_view(ME))
    await node.register("b")
    await node.copies.step(proactive=True)
    await node.runtime.loads.wait_len(1)
    assert node.runtime.loads == ["b@1"]
    record = await node.recorded("b", lambda r: copy_state(r, ME) == LOADED)
    assert record.copies == {ME: Copy(state=LOADED, since=NOW, versions=["1"])}


async def test_a_proactive_load_claimed_elsewhere_first_is_left_to_that_node(make: Make) -> None:
    node = await make(node_view(ME), node_view("n2", capacity=1))  # n2 is too small for placement to pick it
    await node.register("b")
    node.store.interleave("models/b", lambda: add_copy(node, "b", "n2", state=LOADING))
    await node.copies.step(proactive=True)
    record = await node.recorded("b", lambda r: "n2" in r.copies)
    assert record.copies == {"n2": Copy(state=LOADING, since=NOW)}
    assert not node.cache.has_entry("b", "") and node.runtime.loads == []
