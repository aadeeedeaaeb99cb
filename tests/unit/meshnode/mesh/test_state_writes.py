"""MeshState's etcd writes under steady use: last-use times are refreshed one record at a time, the stalest
first, at most once per LAST_USED_WRITE_EVERY_S, whatever the number of models used or the request rate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshnode.mesh.state import LAST_USED_GRANULARITY_S, LAST_USED_WRITE_EVERY_S
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import ME, NOW, WAIT_S, FakeRuntime, NodeParts, node_view

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeParts]:
    store = FakeStore()
    store.publish(node_view(ME))
    parts = await NodeParts(store, tmp_path, runtime=FakeRuntime()).start()
    yield parts
    await parts.stop()


async def flush(node: NodeParts) -> None:
    """Wake the copy flusher (a change of a model nobody has) and wait until it has done its round."""
    done = node.mesh.flush_rounds
    node.mesh.copy_changed("ghost")
    async with asyncio.timeout(WAIT_S):
        while node.mesh.flush_rounds == done:  # noqa: ASYNC110 - a counter, no event to wait on
            await asyncio.sleep(0)
    await node.store.settle()


async def test_last_uses_are_written_one_at_a_time_stalest_first_within_the_budget(node: NodeParts) -> None:
    for name in "abc":
        await node.register(name)
        node.clock.advance(1.0)
        await node.use(name)
        await node.recorded(name, lambda r: r.last_used is not None)
    assert [node.record(n).last_used for n in "abc"] == [NOW + 1, NOW + 2, NOW + 3]
    node.clock.advance(LAST_USED_GRANULARITY_S * 3)
    for name in "abc":
        await node.use(name, times=50)  # a busy minute for all three: one write between them
    writes = node.store.writes
    await flush(node)
    used = NOW + 3 + LAST_USED_GRANULARITY_S * 3
    await node.recorded("a", lambda r: r.last_used == used)
    assert node.store.writes == writes + 1 and node.record("b").last_used == NOW + 2
    await flush(node)  # within the budget: nothing more
    assert node.store.writes == writes + 1
    node.clock.advance(LAST_USED_WRITE_EVERY_S)
    await flush(node)
    await node.recorded("b", lambda r: r.last_used == used)
    assert node.store.writes == writes + 2 and node.record("c").last_used == NOW + 3
