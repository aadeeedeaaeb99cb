"""RuntimeHealth: a runtime that stops answering makes the node withdraw its copies, refuse loads and say
so; when it answers again it is reset and the node rejoins. Real cache and registry, fake runtime and etcd."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshnode.errors import LoadFailed, ModelUnavailable
from meshnode.mesh.runtime_health import RuntimeHealth
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import FakeRuntime, LoadPlan, NodeParts

pytestmark = pytest.mark.timeout(10)


class FakePublisher:
    def __init__(self) -> None:
        self.published = 0

    async def publish_now(self) -> None:
        self.published += 1


class FakeHealth:
    def __init__(self) -> None:
        self.runtime_states: list[bool] = []

    async def runtime(self, up: bool) -> None:
        self.runtime_states.append(up)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeParts]:
    parts = await NodeParts(FakeStore(), tmp_path / "repo", runtime=FakeRuntime()).start(mesh=False)
    yield parts
    await parts.stop()


def watcher(node: NodeParts, publisher: FakePublisher, health: FakeHealth) -> RuntimeHealth:
    return RuntimeHealth(runtime=node.runtime, cache=node.cache, status=node.runtime_status,
                         publisher=publisher, health=health)  # type: ignore[arg-type]  # fakes of both


async def test_two_missed_probes_withdraw_every_copy_and_refuse_loads(node: NodeParts) -> None:
    publisher, health = FakePublisher(), FakeHealth()
    health_watch = watcher(node, publisher, health)
    await node.register("a")
    await node.register("b")
    for name in ("a", "b"):
        node.cache.release(await node.replica.acquire(name, ""))
    changed: list[str] = []
    node.cache.add_listener(changed.append)

    node.runtime.answers = False
    await health_watch.check()  # one miss: a busy runtime, not a dead one
    assert node.runtime_status.up and node.replica.has_copy("a", "")
    await health_watch.check()

    assert not node.runtime_status.up
    assert not node.replica.has_copy("a", "") and not node.replica.has_copy("b", "")
    assert sorted(changed) == ["a", "b"]  # the copy flusher hears of both: their records drop this node
    assert node.cache.stats().used_bytes == 0
    assert health.runtime_states == [False] and publisher.published == 1
    with pytest.raises(ModelUnavailable, match="does not answer") as refused:
        await node.replica.acquire("a", "")
    assert refused.value.retry_elsewhere
    assert node.runtime.loads == ["a@1", "b@1"]  # nothing was tried in the dead runtime


async def test_when_the_runtime_answers_again_it_is_reset_and_the_node_rejoins(node: NodeParts) -> None:
    publisher, health = FakePublisher(), FakeHealth()
    health_watch = watcher(node, publisher, health)
    await node.register("a")
    node.cache.failures.record("a", "1", LoadFailed("the runtime was going down"))
    node.runtime.answers = False
    await health_watch.check()
    await health_watch.check()
    starts = node.runtime.starts

    node.runtime.answers = True
    await health_watch.check()

    assert node.runtime_status.up
    assert node.runtime.starts == starts + 1  # cleared of whatever it still held
    assert not node.cache.failures.active("a", "1")
    assert health.runtime_states == [False, True] and publisher.published == 2
    node.cache.release(await node.replica.acquire("a", ""))
    assert node.replica.has_copy("a", "")


async def test_a_load_under_way_when_the_runtime_goes_sends_its_waiters_elsewhere(node: NodeParts) -> None:
    health_watch = watcher(node, FakePublisher(), FakeHealth())
    await node.register("slow")
    gate = asyncio.Event()
    node.runtime.plan("slow", LoadPlan(gate=gate))
    waiting = asyncio.ensure_future(node.replica.acquire("slow", ""))
    await node.runtime.loads.wait_len(1)
    node.runtime.answers = False
    await health_watch.check()
    await health_watch.check()
    with pytest.raises(ModelUnavailable, match="was loading when this node's runtime went away") as refused:
        await waiting
    assert refused.value.retry_elsewhere
    gate.set()  # the dead runtime's load ends late: its model is unloaded, nothing is counted
    await node.runtime.unloads.wait_len(1)
    assert node.cache.stats().used_bytes == 0 and not node.replica.has_copy("slow", "")
