"""MeshState on a fake etcd: the model view, claim_load's compare-and-set, copy bookkeeping and the janitor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from meshnode.errors import LoadFailed
from meshnode.state.registry import Copy, Failure, ModelRecord
from placement.types import LOADED, LOADING, CopyView, FailureView, ModelView
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import ME, NOW, FakeRuntime, LoadPlan, NodeParts, copy_state, node_view

pytestmark = pytest.mark.timeout(10)

Make = Callable[..., Awaitable[NodeParts]]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    """Starts nodes over one fake etcd (shared, as one etcd is) with me, n2 and n3 in the mesh."""
    store = FakeStore()
    store.publish(node_view(ME), node_view("n2"), node_view("n3"))
    made: list[NodeParts] = []

    async def build(instance_id: str = ME, *, records: tuple[ModelRecord, ...] = (), start_mesh: bool = True
                    ) -> NodeParts:
        parts = NodeParts(store, tmp_path / instance_id, instance_id=instance_id, runtime=FakeRuntime(predicted=77))
        for record in records:  # in etcd before the node starts, as a previous life left them
            await parts.registry.update(record.name, lambda _old, r=record: r)
        made.append(await parts.start(mesh=start_mesh))
        return parts

    yield build
    for parts in made:
        await parts.stop()


def loaded(since: float = NOW) -> Copy:
    return Copy(state=LOADED, since=since)


def loaded_here(since: float = NOW) -> Copy:
    """This node's copy as it records it: with the versions it holds."""
    return Copy(state=LOADED, since=since, versions=["1"])


def loading(since: float = NOW) -> Copy:
    return Copy(state=LOADING, since=since)


# -- the model view ------------------------------------------------------------------------------------


async def test_the_model_view_is_built_from_the_record_and_cached_while_the_record_is_the_same(make: Make) -> None:
    node = await make()
    await node.register("a", copies={"n2": loaded(5.0)}, failures={"n3": Failure(at=7.0, message="corrupt")},
                        last_used=9.0, runtime="triton")
    view = node.mesh.model("a")
    assert view == ModelView(name="a", size_bytes=77, copies=(CopyView("n2", LOADED, 5.0),),
                             failures=(FailureView("n3", 7.0, "corrupt"),), last_used=9.0, runtime="triton")
    assert node.mesh.model("a") is view and node.runtime.predictions == ["a"]  # built once per record
    await node.registry.update("a", lambda r: replace(r, size_bytes=300) if r else None)
    measured = node.mesh.model("a")
    assert measured is not view and measured is not None and measured.size_bytes == 300
    await node.registry.update("a", lambda r: replace(r, size_hint=500) if r else None)
    hinted = node.mesh.model("a")
    assert hinted is not None and hinted.size_bytes == 500 and node.runtime.predictions == ["a"]


async def test_an_unknown_or_unloaded_model_has_no_view_and_one_without_files_counts_as_small(
        make: Make, tmp_path: Path) -> None:
    node = await make()
    await node.register("off", enabled=False)
    assert await node.registry.register_if_absent(ModelRecord(name="nowhere", storage=str(tmp_path / "missing")))
    assert node.mesh.model("ghost") is None and node.mesh.model("off") is None
    view = node.mesh.model("nowhere")
    assert view is not None and view.size_bytes == 0  # its load will say what is wrong


async def test_nodes_are_the_live_instance_records(make: Make) -> None:
    node = await make()
    assert sorted(node.mesh.nodes()) == [ME, "n2", "n3"]
    assert node.mesh.nodes()["n2"] == node_view("n2")


# -- claim_load ---------------------------------------------------------------------------------------------


async def test_the_first_live_claim_holds_the_load_and_later_claims_are_told_where_it_is(make: Make) -> None:
    node = await make()
    await node.register("a")
    assert await node.mesh.claim_load("a", "n2", frozenset()) == "n2"
    assert node.record("a").copies == {"n2": loading()}
    node.clock.advance(1.0)
    assert await node.mesh.claim_load("a", "n3", frozenset()) == "n2"
    assert node.record("a").copies == {"n2": loading()}


async def test_a_claim_skips_copies_the_request_excluded_and_keeps_them_listed(make: Make) -> None:
    node = await make()
    await node.register("a")
    await node.mesh.claim_load("a", "n2", frozenset())
    assert await node.mesh.claim_load("a", "n3", frozenset({"n2"})) == "n3"
    assert node.record("a").copies == {"n2": loading(), "n3": loading()}


async def test_a_dead_nodes_copy_is_dropped_by_the_claim_that_replaces_it(make: Make) -> None:
    node = await make()
    await node.register("a", copies={"ghost": loaded(1.0)})  # ghost's lease ended before the janitor came by
    assert await node.mesh.claim_load("a", "n3", frozenset()) == "n3"
    assert node.record("a").copies == {"n3": loading()}


async def test_concurrent_claims_on_two_nodes_agree_on_the_first_that_wrote(make: Make) -> None:
    mine, theirs = await make(ME), await make("n2")
    await mine.register("a")
    await theirs.recorded("a", lambda r: True)
    store = mine.store
    # n2's claim lands between this node's read of the record and its write: its write loses the race.
    store.interleave("models/a", lambda: theirs.mesh.claim_load("a", "n2", frozenset()))
    assert await mine.mesh.claim_load("a", ME, frozenset()) == "n2"
    assert store.conflicts == 1
    assert store.record("models/a")["copies"] == {"n2": {"state": LOADING, "since": NOW}}
    assert mine.record("a").copies == {"n2": loading()}


async def test_without_etcd_a_claim_goes_unrecorded_and_the_load_goes_where_placement_said(make: Make) -> None:
    node = await make()
    await node.register("a")
    node.store.down = True
    assert await node.mesh.claim_load("a", "n3", frozenset()) == "n3"
    node.store.down = False
    assert node.record("a").copies == {}


async def test_a_claim_for_an_unregistered_model_writes_nothing(make: Make) -> None:
    node = await make()
    writes = node.store.writes
    assert await node.mesh.claim_load("ghost", "n2", frozenset()) == "n2"
    assert node.store.writes == writes and node.registry.get("ghost") is None


# -- copy bookkeeping -------------------------------------------------------------------------------------


async def test_a_copy_loaded_here_is_recorded_with_its_measured_size_and_last_use_then_removed(make: Make) -> None:
    node = await make()
    node.runtime.sizes["a"] = 140
    await node.register("a")
    await node.use("a")
    record = await node.recorded("a", lambda r: copy_state(r, ME) == LOADED)
    assert record.copies == {ME: loaded_here()}
    assert (record.size_bytes, record.last_used) == (140, NOW)
    await node.cache.unload_model("a")
    record = await node.recorded("a", lambda r: ME not in r.copies)
    assert record.copies == {} and record.size_bytes == 140  # the measured size outlives the copy


async def test_a_copy_a_janitor_removed_while_this_node_was_away_is_recorded_again(make: Make) -> None:
    node = await make()
    await node.register("a")
    await node.use("a")
    await node.recorded("a", lambda r: copy_state(r, ME) == LOADED)
    # Another node saw this node's lease expire (a cut link) and removed its copy; this node came back.
    await node.registry.update("a", lambda r: replace(r, copies={}) if r is not None else None)
    node.mesh.copy_changed("unrelated")  # the flusher's next round, whatever wakes it
    record = await node.recorded("a", lambda r: copy_state(r, ME) == LOADED)
    assert record.copies == {ME: loaded_here()}


async def test_a_claimed_load_that_fails_here_becomes_a_failure_in_the_record(make: Make) -> None:
    node = await make()
    await node.register("bad")
    node.runtime.plan("bad", LoadPlan(error=LoadFailed("model 'bad' is corrupt")))
    assert await node.mesh.claim_load("bad", ME, frozenset()) == ME
    with pytest.raises(LoadFailed):
        await node.use("bad")
    record = await node.recorded("bad", lambda r: ME in r.failures and ME not in r.copies)
    assert (record.copies, record.failures) == ({}, {ME: Failure(at=NOW, message="model 'bad' is corrupt")})
    node.clock.advance(31.0)  # past the backoff it is tried again; a load that works clears the failure
    await node.use("bad")
    record = await node.recorded("bad", lambda r: ME not in r.failures)
    assert (record.copies, record.failures) == ({ME: loaded_here(NOW + 31.0)}, {})


async def test_a_copy_listed_for_this_node_that_it_does_not_hold_is_removed_when_it_starts(make: Make,
                                                                                           tmp_path: Path) -> None:
    stale = ModelRecord(name="a", storage=str(tmp_path), copies={ME: loading(1.0), "n2": loaded(2.0)})
    node = await make(records=(stale,))
    record = await node.recorded("a", lambda r: ME not in r.copies, timeout=0.5)
    assert record.copies == {"n2": loaded(2.0)}


async def test_copies_recorded_during_an_etcd_outage_converge_once_it_is_back(make: Make) -> None:
    node = await make()
    await node.register("a")
    await node.register("b")
    node.store.down = True
    await node.use("a")  # the cache serves; its record cannot say so yet
    await node.store.refusals.wait_len(1)
    node.store.down = False
    await node.use("b")
    for name in ("a", "b"):
        record = await node.recorded(name, lambda r: ME in r.copies)
        assert record.copies == {ME: loaded_here()}


async def test_stop_ends_the_flusher_even_when_a_copy_change_arrives_as_it_stops(make: Make) -> None:
    node = await make()
    await node.store.settle()  # the flusher is waiting for a change
    node.mesh.copy_changed("a")  # e.g. an unload finishing during the drain
    stopping = asyncio.ensure_future(node.mesh.stop())  # its own task: stop() suppresses CancelledError
    try:
        done, _ = await asyncio.wait({stopping}, timeout=1.0)
        assert stopping in done, "MeshState.stop() is still waiting for its copy flusher"
    finally:
        await node.mesh.stop()  # a second cancel reaches the flusher
        await stopping


# -- the janitor --------------------------------------------------------------------------------------------


async def test_copies_of_nodes_that_left_are_removed_by_a_node_that_sees_them_go(make: Make, tmp_path: Path) -> None:
    record = ModelRecord(name="a", storage=str(tmp_path), copies={"n2": loaded(), "n3": loaded(), "ghost": loaded()})
    node = await make(records=(record,))
    found = await node.recorded("a", lambda r: "ghost" not in r.copies)  # gone before this node started
    assert found.copies == {"n2": loaded(), "n3": loaded()}
    node.store.leave("n3")
    found = await node.recorded("a", lambda r: "n3" not in r.copies)
    assert found.copies == {"n2": loaded()}
    assert node.peers.forgotten == ["n3"] and sorted(node.mesh.nodes()) == [ME, "n2"]


async def test_the_janitor_never_removes_this_nodes_own_copy(tmp_path: Path) -> None:
    store = FakeStore()
    store.publish(node_view("n2"), node_view("n3"))  # this node has not published its own record yet
    node = await NodeParts(store, tmp_path / "repo").start()
    try:
        await node.register("a")
        await node.use("a")
        await node.registry.update("a", lambda r: replace(r, copies={**r.copies, "n3": loaded()}) if r else None)
        await node.recorded("a", lambda r: ME in r.copies and "n3" in r.copies)
        store.leave("n3")
        found = await node.recorded("a", lambda r: "n3" not in r.copies)
        assert found.copies == {ME: loaded_here()}
    finally:
        await node.stop()
