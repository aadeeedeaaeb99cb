"""AliasSwitch over the real aliases, registry, mesh state and copy manager (fake etcd), with fake peers.

The fake peers load a copy and record it as loaded, as the peer's copy flusher would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from meshnode.control.alias_switch import AliasSwitch
from meshnode.errors import Aborted, AlreadyExists, InvalidInput, LoadFailed, ModelNotFound
from meshnode.state.aliases import AliasRecord
from meshnode.state.registry import Copy
from placement.types import LOADED, LOADING
from router.errors import MeshError
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import ME, NOW, Log, NodeParts, node_view, peer_error

pytestmark = pytest.mark.timeout(10)

BUDGET_S = 5.0
Code = grpc.StatusCode


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeParts]:
    store = FakeStore()
    # This node is too small for the models: placement puts their copies on n2 and n3.
    store.publish(node_view(ME, capacity=50), node_view("n2"), node_view("n3"))
    parts = await NodeParts(store, tmp_path / "repo").start()

    async def peer_loads_and_records(instance_id: str, name: str) -> None:
        copy = Copy(state=LOADED, since=NOW)
        await parts.registry.update(name, lambda r: replace(r, copies={**r.copies, instance_id: copy}) if r else None)

    parts.peers.on_load = peer_loads_and_records
    await parts.register("m1", copies={"n2": Copy(state=LOADED, since=NOW), "n3": Copy(state=LOADED, since=NOW)})
    await parts.register("m2")
    yield parts
    await parts.stop()


def switch_of(node: NodeParts) -> AliasSwitch:
    return AliasSwitch(aliases=node.aliases, registry=node.registry, mesh=node.mesh, copies=node.copies)


def alias_of(node: NodeParts, alias: str) -> tuple[str, str | None, str | None, str | None, bool]:
    """(model, switching_to, last_error, previous_model, auto_delete) as etcd holds the alias."""
    found = node.store.record(f"aliases/{alias}")
    return found["model"], found["switching_to"], found["last_error"], found["previous_model"], found["auto_delete"]


async def point(node: NodeParts, alias: str, model: str) -> None:
    assert await node.aliases.write(AliasRecord(alias=alias, model=model), 0) is not None


async def test_a_switch_loads_the_target_with_as_many_copies_first_then_switches_in_one_write(node: NodeParts) -> None:
    await point(node, "front", "m1")
    during: Log[tuple[str, str | None, list[str]]] = Log()
    recorded_load = node.peers.on_load
    assert recorded_load is not None

    async def load(instance_id: str, name: str) -> None:
        current = node.aliases.get("front")
        assert current is not None
        during.append((current.model, current.switching_to, node.aliases.pointing_at("m2")))
        await recorded_load(instance_id, name)

    node.peers.on_load = load
    switched = await switch_of(node).set("front", "m2", auto_delete=False, budget_s=BUDGET_S)
    assert (switched.alias, switched.model, switched.previous_model, switched.switching_to, switched.last_error) == \
        ("front", "m2", "m1", None, None)
    assert sorted(node.peers.loads) == [("n2", "m2"), ("n3", "m2")]  # m1 has two loaded copies
    assert during == [("m1", "m2", ["front"])] * 2  # requests still went to m1 while m2 loaded
    written = node.store.values_written("aliases/front")
    assert [(w["model"], w["switching_to"]) for w in written if w is not None] == \
        [("m1", None), ("m1", "m2"), ("m2", None)]  # the switch itself: one write
    assert node.aliases.targets["front"] == "m2" and node.aliases.pointing_at("m1") == []
    assert node.record("m2").delete_when_unaliased is False


async def test_a_new_alias_gets_one_loaded_copy_of_its_model_and_is_written_once(node: NodeParts) -> None:
    switched = await switch_of(node).set("fresh", "m2", auto_delete=True, budget_s=BUDGET_S)
    assert (switched.model, switched.previous_model, switched.auto_delete) == ("m2", None, True)
    assert len(node.peers.loads) == 1 and node.peers.loads[0][1] == "m2"
    assert len(node.store.values_written("aliases/fresh")) == 1
    assert node.aliases.targets["fresh"] == "m2"
    assert node.record("m2").delete_when_unaliased is True  # retired once no alias points at it


async def test_a_target_already_loaded_enough_is_switched_to_without_loading(node: NodeParts) -> None:
    await point(node, "front", "m2")
    await switch_of(node).set("front", "m1", auto_delete=False, budget_s=BUDGET_S)
    assert node.peers.loads == [] and node.aliases.targets["front"] == "m1"


async def test_a_target_that_cannot_load_leaves_the_alias_and_says_why(node: NodeParts) -> None:
    await point(node, "front", "m1")
    node.peers.load_errors = {"n2": [peer_error("n2", "disk full")], "n3": [peer_error("n3", "disk full")]}
    with pytest.raises(LoadFailed) as raised:
        await switch_of(node).set("front", "m2", auto_delete=False, budget_s=BUDGET_S)
    assert str(raised.value).startswith("alias 'front' stays on 'm1': loading 'm2' failed: ")
    why = str(raised.value).removeprefix("alias 'front' stays on 'm1': ")
    assert why in ("loading 'm2' failed: n2: node n2: disk full; n3: node n3: disk full",
                   "loading 'm2' failed: n3: node n3: disk full; n2: node n2: disk full")
    assert alias_of(node, "front") == ("m1", None, why, None, False)
    assert node.aliases.targets["front"] == "m1" and node.aliases.pointing_at("m2") == []


async def test_a_new_alias_whose_model_cannot_load_is_not_set(node: NodeParts) -> None:
    node.peers.load_errors = {"n2": [peer_error("n2", "disk full")], "n3": [peer_error("n3", "disk full")]}
    with pytest.raises(LoadFailed, match="^alias 'fresh' not set: loading 'm2' failed: "):
        await switch_of(node).set("fresh", "m2", auto_delete=False, budget_s=BUDGET_S)
    assert "aliases/fresh" not in node.store.data and "fresh" not in node.aliases.targets


async def test_copies_loaded_but_not_recorded_within_the_budget_fail_the_switch(node: NodeParts) -> None:
    await point(node, "front", "m1")
    node.peers.on_load = None  # the peers answer, but their records never show a loaded copy
    with pytest.raises(LoadFailed) as raised:
        await switch_of(node).set("front", "m2", auto_delete=False, budget_s=0.1)
    assert str(raised.value) == "alias 'front' stays on 'm1': models/m2 did not reach the expected state within 0.1 s"
    assert alias_of(node, "front")[:2] == ("m1", None)


async def test_setting_an_alias_to_its_model_again_only_settles_its_fields(node: NodeParts) -> None:
    await point(node, "front", "m1")
    settled = await switch_of(node).set("front", "m1", auto_delete=True, budget_s=BUDGET_S)
    assert (settled.model, settled.auto_delete, settled.switching_to) == ("m1", True, None)
    assert node.peers.loads == [] and node.record("m1").delete_when_unaliased is True
    writes = len(node.store.values_written("aliases/front"))
    await switch_of(node).set("front", "m1", auto_delete=True, budget_s=BUDGET_S)
    assert len(node.store.values_written("aliases/front")) == writes  # nothing to change: nothing written


async def test_a_switch_overtaken_by_another_write_of_its_alias_aborts_and_the_other_stands(node: NodeParts) -> None:
    await point(node, "front", "m1")
    recorded_load = node.peers.on_load
    assert recorded_load is not None

    async def load_while_another_call_switches(instance_id: str, name: str) -> None:
        if instance_id == "n2":
            await node.store.put("aliases/front", AliasRecord(alias="front", model="m3").to_json())
        await recorded_load(instance_id, name)

    node.peers.on_load = load_while_another_call_switches
    with pytest.raises(Aborted, match="^alias 'front' was changed by another call during the switch; it is "
                                      "unchanged here$"):
        await switch_of(node).set("front", "m2", auto_delete=False, budget_s=BUDGET_S)
    assert alias_of(node, "front")[:2] == ("m3", None)


async def test_a_switch_the_caller_gives_up_on_leaves_no_switching_marker(node: NodeParts) -> None:
    await point(node, "front", "m1")
    never = asyncio.Event()

    async def slow_load(instance_id: str, name: str) -> None:
        await never.wait()

    node.peers.on_load = slow_load
    switching = asyncio.create_task(switch_of(node).set("front", "m2", auto_delete=False, budget_s=BUDGET_S))
    await node.peers.loads.wait_len(1)
    assert alias_of(node, "front")[:2] == ("m1", "m2")
    switching.cancel()
    with pytest.raises(asyncio.CancelledError):
        await switching
    assert alias_of(node, "front") == ("m1", None, None, None, False)


@pytest.mark.parametrize(("alias", "model", "error", "message"), [
    ("front", "front", InvalidInput, "alias 'front' cannot point at itself"),
    ("m1", "m2", AlreadyExists, "'m1' is the name of a registered model; an alias needs a name of its own"),
    ("other", "front", InvalidInput, "'front' is an alias; an alias must point at a model"),
    ("other", "ghost", ModelNotFound, "cannot point alias 'other' at 'ghost': no such model is registered"),
    ("other", "off", InvalidInput, "cannot point alias 'other' at 'off': the model is unloaded; load it first"),
    ("a/b", "m1", InvalidInput, "invalid model name 'a/b'"),
])
async def test_bad_switches_are_refused_before_anything_is_written(
        node: NodeParts, alias: str, model: str, error: type[MeshError], message: str) -> None:
    await point(node, "front", "m1")
    await node.register("off", enabled=False)
    writes = node.store.writes
    with pytest.raises(error) as raised:
        await switch_of(node).set(alias, model, auto_delete=False, budget_s=BUDGET_S)
    assert str(raised.value) == message
    assert node.store.writes == writes and node.peers.loads == []


async def test_a_target_unregistered_while_it_loads_fails_the_switch_with_not_found(node: NodeParts) -> None:
    async def unregistered_meanwhile(instance_id: str, name: str) -> None:
        await node.registry.delete(name)
        raise peer_error(instance_id, f"model '{name}' is not registered")

    node.peers.on_load = unregistered_meanwhile
    with pytest.raises(LoadFailed, match="^alias 'fresh' not set: loading 'm2' failed: ") as raised:
        await switch_of(node).set("fresh", "m2", auto_delete=False, budget_s=BUDGET_S)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert "fresh" not in node.aliases.targets


@pytest.mark.parametrize(("n2", "n3", "status"), [
    (Code.INTERNAL, Code.INTERNAL, Code.INTERNAL),  # a broken file, as Triton answers its load
    (Code.NOT_FOUND, Code.NOT_FOUND, Code.NOT_FOUND),  # no version the policy serves
    (Code.UNAVAILABLE, Code.UNAVAILABLE, Code.UNAVAILABLE),  # its loads timed out: it may load later
    (Code.NOT_FOUND, Code.INTERNAL, Code.INTERNAL),  # the copies disagree: no one status to keep
], ids=["internal", "not-found", "unavailable", "mixed"])
async def test_a_target_that_cannot_load_fails_the_switch_with_its_load_failures_status(
        node: NodeParts, n2: grpc.StatusCode, n3: grpc.StatusCode, status: grpc.StatusCode) -> None:
    await point(node, "front", "m1")  # two copies: m2 is loaded on two nodes
    node.peers.load_errors = {"n2": [peer_error("n2", "broken", n2)], "n3": [peer_error("n3", "broken", n3)]}
    with pytest.raises(LoadFailed, match="^alias 'front' stays on 'm1': loading 'm2' failed: n[23]: node n[23]: "
                                         "broken; n[23]: node n[23]: broken$") as raised:
        await switch_of(node).set("front", "m2", auto_delete=False, budget_s=BUDGET_S)
    assert raised.value.code == status


async def test_a_target_loaded_here_and_still_recorded_as_loading_is_not_placed_again(node: NodeParts) -> None:
    # RegisterModel then SetAlias at once: the load here is done, the record says so a flush later.
    await node.registry.update("m2", lambda r: replace(r, copies={ME: Copy(state=LOADING, since=NOW)}) if r else None)
    switching = asyncio.create_task(switch_of(node).set("front", "m2", auto_delete=False, budget_s=BUDGET_S))
    await node.store.settle()
    assert not switching.done()  # waiting for the copy to be recorded as loaded
    await node.registry.update("m2", lambda r: replace(r, copies={ME: Copy(state=LOADED, since=NOW)}) if r else None)
    assert (await switching).model == "m2"
    assert node.peers.loads == []  # no second copy placed elsewhere
