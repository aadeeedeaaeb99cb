"""RepositorySync over the real registry and control (fake etcd): models follow the store's listing, models
registered through the API stay, a failed listing changes nothing, and only the polling node lists."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshnode.control.repository_sync import RepositorySync, SyncResult
from meshnode.errors import StorageUnavailable
from meshnode.state.aliases import AliasRecord
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import ME, NodeParts, node_view

pytestmark = pytest.mark.timeout(10)
REPO = "s3://bucket/models"


class Store:
    """The store's listing, as a test sets it; None: the store does not answer."""

    def __init__(self) -> None:
        self.models: dict[str, str] | None = {}
        self.listings = 0
        self.listed_thrice = asyncio.Event()

    async def list_models(self) -> dict[str, str]:
        self.listings += 1
        if self.listings >= 3:
            self.listed_thrice.set()
        if self.models is None:
            raise StorageUnavailable(f"model store {REPO} is unreachable")
        return dict(self.models)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeParts]:
    store = FakeStore()
    store.publish(node_view(ME))
    parts = await NodeParts(store, tmp_path / "repo").start()
    yield parts
    await parts.stop()


def sync_for(node: NodeParts, store: Store, polls_here: bool = True, interval_s: float = 3600.0) -> RepositorySync:
    return RepositorySync(repository_uri=REPO, list_models=store.list_models, registry=node.registry,
                          unregister=lambda name: node.control.unload(name, unregister=True),
                          polls_here=lambda: polls_here, runtime="onnxruntime", interval_s=interval_s)


async def test_models_follow_the_listing_and_api_registrations_stay(node: NodeParts) -> None:
    store = Store()
    sync = sync_for(node, store)
    store.models = {"a": f"{REPO}/a", "b": f"{REPO}/b"}
    assert await sync.sync() == SyncResult(("a", "b"), ())
    record = node.registry.get("a")
    assert record is not None and (record.storage, record.origin, record.runtime) == (f"{REPO}/a", REPO, "onnxruntime")

    await node.registry.register_if_absent(type(record)(name="mine", storage="/models/mine"))
    store.models = {"b": f"{REPO}/b", "c": f"{REPO}/c"}
    assert await sync.sync() == SyncResult(("c",), ("a",))
    assert sorted(r.name for r in node.registry.records()) == ["b", "c", "mine"]
    assert await sync.sync() == SyncResult((), ())  # nothing changed: nothing written


async def test_a_failed_listing_changes_nothing_and_an_aliased_model_stays(node: NodeParts) -> None:
    store = Store()
    sync = sync_for(node, store)
    store.models = {"a": f"{REPO}/a"}
    await sync.sync()
    store.models = None
    with pytest.raises(StorageUnavailable):
        await sync.sync()
    assert node.registry.get("a") is not None
    assert await node.aliases.write(AliasRecord(alias="live", model="a"), 0) is not None
    store.models = {}
    assert await sync.sync() == SyncResult((), ())  # refused while an alias points at it
    assert node.registry.get("a") is not None


async def test_only_the_polling_node_lists_the_store(node: NodeParts) -> None:
    store, other = Store(), Store()
    store.models = other.models = {"a": f"{REPO}/a"}
    here, elsewhere = sync_for(node, store, interval_s=0.01), sync_for(node, other, polls_here=False, interval_s=0.01)
    here.start()
    elsewhere.start()
    try:
        await store.listed_thrice.wait()
    finally:
        await here.stop()
        await elsewhere.stop()
    assert node.registry.get("a") is not None and other.listings == 0
