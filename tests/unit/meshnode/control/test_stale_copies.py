"""StaleCopies: a node unloads its copy of a model re-registered with new files through another node, so the next
request loads the new files (two nodes' real parts over one fake etcd, fake runtimes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshnode.background import BackgroundTasks
from meshnode.control.registration import Registration
from meshnode.control.stale_copies import StaleCopies
from meshnode.state.registry import ModelRecord
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import ME, LoadPlan, NodeParts, node_view, write_model

pytestmark = pytest.mark.timeout(10)


class Mesh:
    """Node `a`, where models are registered, and node `b`, which watches for stale copies."""

    def __init__(self, store: FakeStore, a: NodeParts, b: NodeParts) -> None:
        self.store, self.a, self.b = store, a, b
        self.background = BackgroundTasks()
        StaleCopies(registry=b.registry, cache=b.cache, background=self.background)

    async def register(self, registration: Registration) -> ModelRecord:
        """Through node a; returns the record once node b's view has it."""
        await self.a.control.register(registration)
        await self.store.settle()
        return self.b.record(registration.name)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    store = FakeStore()
    store.publish(node_view(ME), node_view("b"))
    a = await NodeParts(store, tmp_path / "repo-a").start()
    b = await NodeParts(store, tmp_path / "repo-b", instance_id="b").start()
    mesh = Mesh(store, a, b)
    yield mesh
    await mesh.background.cancel()
    await b.stop()
    await a.stop()


async def test_new_files_registered_elsewhere_unload_the_copy_here_and_the_next_request_loads_them(
        mesh: Mesh) -> None:
    first = await mesh.register(Registration("m", files={"1/model.onnx": b"old"}, lazy=True))
    await mesh.b.use("m")
    assert first.generation == 0 and mesh.b.runtime.loads == ["m@1"]

    second = await mesh.register(Registration("m", files={"1/model.onnx": b"new"}, lazy=True))
    assert second.generation == 1
    await mesh.b.runtime.unloads.wait_len(1)
    assert mesh.b.runtime.unloads == ["m@1"] and not mesh.b.cache.has_entry("m", "")
    await mesh.b.use("m")
    assert mesh.b.runtime.loads == ["m@1", "m@1"]  # loaded again, from the new files

    await mesh.register(Registration("m", lazy=True, min_copies=2))  # a change of how it is kept, not of files
    await mesh.b.use("m")
    assert mesh.b.record("m").generation == 1 and mesh.b.runtime.unloads == ["m@1"]


async def test_a_new_storage_location_is_a_new_generation_the_same_one_is_not(mesh: Mesh, tmp_path: Path) -> None:
    old, new = (write_model(tmp_path / where, "m") for where in ("old", "new"))
    await mesh.register(Registration("m", storage_uri=str(old), lazy=True))
    await mesh.b.use("m")
    assert (await mesh.register(Registration("m", storage_uri=str(old), lazy=True))).generation == 0
    assert (await mesh.register(Registration("m", storage_uri=str(new), lazy=True))).generation == 1
    await mesh.b.runtime.unloads.wait_len(1)
    assert mesh.b.runtime.unloads == ["m@1"]


async def test_a_copy_that_began_loading_the_old_files_is_unloaded_once_loaded(mesh: Mesh) -> None:
    await mesh.register(Registration("m", files={"1/model.onnx": b"old"}, lazy=True))
    gate = asyncio.Event()
    mesh.b.runtime.plan("m", LoadPlan(gate=gate))
    loading = asyncio.create_task(mesh.b.use("m"))
    await mesh.b.runtime.loads.wait_len(1)
    await mesh.register(Registration("m", files={"1/model.onnx": b"new"}, lazy=True))
    gate.set()
    await loading  # the request that waited for it is answered (by the old files, as it asked before the change)
    await mesh.b.runtime.unloads.wait_len(1)
    assert not mesh.b.cache.has_entry("m", "")


async def test_a_copy_loaded_under_the_newest_generation_stays_through_later_record_changes(mesh: Mesh) -> None:
    await mesh.register(Registration("m", files={"1/model.onnx": b"old"}, lazy=True))
    await mesh.register(Registration("m", files={"1/model.onnx": b"new"}, lazy=True))
    await mesh.b.use("m")
    await mesh.a.use("m")  # node a's copy: records change, the generation does not
    await mesh.register(Registration("m", lazy=True, pinned=True))
    await mesh.b.use("m")
    assert mesh.b.runtime.loads == ["m@1"] and mesh.b.runtime.unloads == []
