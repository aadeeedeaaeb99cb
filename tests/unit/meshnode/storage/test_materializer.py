"""materialize(): local paths in place; remote models pulled once into the disk tier, reused while the store
says they are unchanged, pulled again when they change, served from disk while the store is down."""

from __future__ import annotations

import asyncio
import io
import tarfile
import threading
from pathlib import Path

import fsspec
import pytest

from meshnode.errors import InvalidInput, LoadFailed, ModelNotFound, StorageUnavailable
from meshnode.storage.disk_cache import MANIFEST, DiskCache
from meshnode.storage.materializer import Materializer
from meshnode.storage.remote import Listing, ObjectStore
from meshnode.storage.uris import StorageUri, StoreOptions
from tests.unit.meshnode.storage.conftest import Put

FILES = {"config.pbtxt": b"name: 'mlp'", "1/model.onnx": b"weights" * 10}


class CountingStore(ObjectStore):
    """The memory store, counting calls; `down` makes the store unreachable, `gate` holds downloads."""

    def __init__(self) -> None:
        super().__init__(StoreOptions())
        self.listings = 0
        self.fetches = 0
        self.down = False
        self.gate = threading.Event()
        self.gate.set()
        self.fetching = threading.Event()  # a download has started (and waits at the gate)

    def listing(self, uri: StorageUri) -> Listing:
        self.listings += 1
        if self.down:
            raise StorageUnavailable(f"storage_uri '{uri.shown}': the store is unavailable")
        return super().listing(uri)

    def fetch(self, uri: StorageUri, listing: Listing, target: Path) -> Path:
        self.fetches += 1
        self.fetching.set()
        assert self.gate.wait(10)
        return super().fetch(uri, listing, target)






def _tree(model: Path) -> dict[str, bytes]:
    return {p.relative_to(model).as_posix(): p.read_bytes() for p in model.rglob("*") if p.is_file()}


def _names(directory: Path, pattern: str = "*") -> list[str]:
    return sorted(p.name for p in directory.rglob(pattern))


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


async def test_a_remote_model_is_pulled_once_then_served_from_disk(
        root: str, put: Put, store: CountingStore, tmp_path: Path) -> None:
    put(f"{root}/mlp", FILES)
    materializer = Materializer(store, DiskCache(tmp_path))
    model = await materializer.materialize(f"memory:/{root}/mlp")
    assert _tree(model) == FILES and model.is_relative_to(tmp_path)
    assert await materializer.materialize(f"memory:/{root}/mlp") == model
    assert (store.listings, store.fetches) == (2, 1)
    stats = materializer.stats()
    assert (stats.hits, stats.misses, stats.bytes_pulled, stats.disk_models) == (1, 1, 81, 1)
    assert stats.disk_bytes >= 81 and stats.pull_seconds > 0


async def test_a_restarted_node_reuses_its_disk_without_downloading(
        root: str, put: Put, store: CountingStore, tmp_path: Path) -> None:
    put(f"{root}/mlp", FILES)
    first = await Materializer(store, DiskCache(tmp_path)).materialize(f"memory:/{root}/mlp")
    restarted = Materializer(store, DiskCache(tmp_path))
    assert await restarted.materialize(f"memory:/{root}/mlp") == first
    assert store.fetches == 1 and restarted.stats().hits == 1


async def test_a_changed_object_is_pulled_again(root: str, put: Put, store: CountingStore, tmp_path: Path) -> None:
    put(f"{root}/mlp", FILES)
    materializer = Materializer(store, DiskCache(tmp_path))
    await materializer.materialize(f"memory:/{root}/mlp")
    put(f"{root}/mlp", {"1/model.onnx": b"new weights"})
    model = await materializer.materialize(f"memory:/{root}/mlp")
    assert (model / "1" / "model.onnx").read_bytes() == b"new weights"
    assert store.fetches == 2 and materializer.stats().misses == 2


async def test_concurrent_loads_of_one_model_pull_it_once(
        root: str, put: Put, store: CountingStore, tmp_path: Path) -> None:
    put(f"{root}/mlp", FILES)
    materializer = Materializer(store, DiskCache(tmp_path))
    store.gate.clear()
    calls = [asyncio.create_task(materializer.materialize(f"memory:/{root}/mlp")) for _ in range(5)]
    assert await asyncio.to_thread(store.fetching.wait, 10)  # every call has joined the one pull by then
    store.gate.set()
    paths = await asyncio.gather(*calls)
    assert len(set(paths)) == 1 and (store.listings, store.fetches) == (1, 1)


async def test_a_store_that_is_down_still_serves_what_is_on_disk(
        root: str, put: Put, store: CountingStore, tmp_path: Path) -> None:
    put(f"{root}/on_disk", FILES)
    put(f"{root}/not_on_disk", FILES)
    materializer = Materializer(store, DiskCache(tmp_path))
    model = await materializer.materialize(f"memory:/{root}/on_disk")
    store.down = True
    assert await materializer.materialize(f"memory:/{root}/on_disk") == model
    with pytest.raises(StorageUnavailable, match="not_on_disk"):
        await materializer.materialize(f"memory:/{root}/not_on_disk")
    store.down = False
    assert _tree(await materializer.materialize(f"memory:/{root}/not_on_disk")) == FILES


async def test_a_model_gone_from_the_store_is_gone_from_disk(
        root: str, put: Put, store: CountingStore, tmp_path: Path) -> None:
    put(f"{root}/mlp", FILES)
    cache = DiskCache(tmp_path)
    materializer = Materializer(store, cache)
    await materializer.materialize(f"memory:/{root}/mlp")
    fsspec.filesystem("memory").rm(f"{root}/mlp", recursive=True)
    with pytest.raises(ModelNotFound, match=f"'memory:/{root}/mlp'"):
        await materializer.materialize(f"memory:/{root}/mlp")
    assert len(cache) == 0 and _names(tmp_path) == []


async def test_a_failed_pull_leaves_nothing_on_disk(root: str, put: Put, store: CountingStore, tmp_path: Path) -> None:
    put(root, {"bad.tgz": b"not a gzip stream"})
    materializer = Materializer(store, DiskCache(tmp_path))
    with pytest.raises(LoadFailed, match="corrupt or truncated archive"):
        await materializer.materialize(f"memory:/{root}/bad.tgz")
    assert _names(tmp_path) == [] and materializer.stats().misses == 0


async def test_a_local_path_is_used_in_place(store: CountingStore, tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    materializer = Materializer(store, DiskCache(tmp_path / "cache"))
    assert await materializer.materialize(str(tmp_path / "m")) == tmp_path / "m"
    assert await materializer.materialize(f"file://{tmp_path}/m") == tmp_path / "m"
    with pytest.raises(InvalidInput, match="does not exist"):
        await materializer.materialize(str(tmp_path / "missing"))
    assert store.listings == 0 and materializer.stats().disk_models == 0


async def test_an_archive_is_extracted_into_the_disk_tier(store: CountingStore, tmp_path: Path) -> None:
    archive = tmp_path / "mlp.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in FILES.items():
            info = tarfile.TarInfo(f"mlp/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    materializer = Materializer(store, DiskCache(tmp_path / "cache"))
    model = await materializer.materialize(str(archive))
    assert model.name == "mlp" and _tree(model) == FILES and model.is_relative_to(tmp_path / "cache")
    assert not _names(tmp_path / "cache", "*.tar.gz")  # the archive itself is not kept


async def test_a_model_in_use_is_not_evicted_and_the_oldest_unused_one_is(
        root: str, put: Put, store: CountingStore, tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        put(f"{root}/{name}", {"1/model.onnx": b"x" * 100})
    materializer = Materializer(store, DiskCache(tmp_path, max_bytes=250))
    async with materializer.materialized(f"memory:/{root}/a") as a:
        await materializer.materialize(f"memory:/{root}/b")
        await materializer.materialize(f"memory:/{root}/c")  # over budget: b goes, a is in use
        assert (a / "1" / "model.onnx").exists()
    stats = materializer.stats()
    assert (stats.evictions, stats.disk_models, stats.disk_bytes) == (1, 2, 200)


async def test_a_manifest_it_cannot_read_is_pulled_again(
        root: str, put: Put, store: CountingStore, tmp_path: Path) -> None:
    put(f"{root}/mlp", FILES)
    await Materializer(store, DiskCache(tmp_path)).materialize(f"memory:/{root}/mlp")
    _break_manifest(tmp_path)
    model = await Materializer(store, DiskCache(tmp_path)).materialize(f"memory:/{root}/mlp")
    assert _tree(model) == FILES and store.fetches == 2


def _break_manifest(cache_dir: Path) -> None:
    (manifest,) = cache_dir.glob(f"*/{MANIFEST}")
    manifest.write_text(manifest.read_text().replace('"objects"', '"renamed"'))
