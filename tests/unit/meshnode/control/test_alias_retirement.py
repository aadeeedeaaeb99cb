"""Retirement of models only aliases kept, swept by hand with a manual clock, unregistering through ModelControl."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshnode.control.alias_retirement import Retirement
from meshnode.errors import Internal, ModelNotFound
from meshnode.state.aliases import AliasRecord
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import ManualClock, NodeParts

pytestmark = pytest.mark.timeout(10)

GRACE_S = 10.0


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeParts]:
    parts = await NodeParts(FakeStore(), tmp_path / "repo").start(mesh=False)
    yield parts
    await parts.stop()


def retirement(node: NodeParts, clock: ManualClock) -> Retirement:
    return Retirement(registry=node.registry, aliases=node.aliases, grace_s=GRACE_S, clock=clock,
                      unregister=functools.partial(node.control.unload, unregister=True))


async def test_a_marked_model_is_unregistered_once_no_alias_pointed_at_it_for_the_grace(node: NodeParts) -> None:
    clock = ManualClock(0.0)
    await node.register("old", delete_when_unaliased=True)  # marked before the retirement started: found too
    await node.register("kept")  # never marked
    sweeper = retirement(node, clock)
    revision = await node.aliases.write(AliasRecord(alias="front", model="old"), 0)
    assert revision is not None
    await sweeper.sweep()
    clock.advance(2 * GRACE_S)
    await sweeper.sweep()
    assert node.registry.get("old") is not None  # an alias points at it: kept however long
    await node.aliases.write(AliasRecord(alias="front", model="kept"), revision)
    await sweeper.sweep()  # unreferenced from now on
    clock.advance(GRACE_S - 1)
    await sweeper.sweep()
    assert node.registry.get("old") is not None
    clock.advance(1)
    await sweeper.sweep()
    assert node.registry.get("old") is None and node.registry.get("kept") is not None


async def test_an_alias_pointing_at_it_again_during_the_grace_starts_it_over(node: NodeParts) -> None:
    clock = ManualClock(0.0)
    sweeper = retirement(node, clock)
    await node.register("old", delete_when_unaliased=True)  # marked later: the registry listener adds it
    await sweeper.sweep()
    clock.advance(GRACE_S - 1)
    revision = await node.aliases.write(AliasRecord(alias="back", model="old"), 0)
    assert revision is not None
    await sweeper.sweep()
    assert await node.aliases.delete("back")
    clock.advance(1)
    await sweeper.sweep()  # a fresh grace starts now
    clock.advance(GRACE_S - 1)
    await sweeper.sweep()
    assert node.registry.get("old") is not None
    clock.advance(1)
    await sweeper.sweep()
    assert node.registry.get("old") is None


async def test_a_model_retired_elsewhere_first_or_failing_to_unregister_is_left_for_the_next_sweep(
        node: NodeParts) -> None:
    clock = ManualClock(0.0)
    calls: list[str] = []
    failures = [ModelNotFound("gone already"), Internal("etcd refused the delete")]

    async def unregister(name: str) -> None:
        calls.append(name)
        raise failures.pop(0)

    await node.register("old", delete_when_unaliased=True)
    sweeper = Retirement(registry=node.registry, aliases=node.aliases, unregister=unregister, grace_s=0.0,
                         clock=clock)
    await sweeper.sweep()  # another node retired it first: nothing to say
    await sweeper.sweep()  # a real failure: logged, still marked
    clock.advance(1)
    await node.registry.delete("old")  # unregistered at last: no longer marked
    await sweeper.sweep()
    assert calls == ["old", "old"]
