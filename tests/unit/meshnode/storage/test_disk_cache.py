"""The disk tier: entries appear whole or not at all, survive a restart in their order of use, and are
evicted least recently used first, never while pinned."""

from __future__ import annotations

from pathlib import Path

from meshnode.storage.disk_cache import MANIFEST, DiskCache


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def _put(cache: DiskCache, key: str, size: int, version: str = "v1") -> Path:
    staging = cache.staging(key)
    model = staging / "files" / "m"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.onnx").write_bytes(b"x" * size)
    return cache.commit(key, staging, model, f"s3://b/{key}", {"tag": version}).model


def test_a_committed_entry_is_found_with_its_model_path_and_bytes(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, clock=Clock())
    model = _put(cache, "a", 100)
    entry = cache.lookup("a")
    assert entry is not None and entry.model == model == tmp_path / "a" / "files" / "m"
    assert (entry.bytes, entry.version, entry.uri) == (100, {"tag": "v1"}, "s3://b/a")
    assert (model / "1" / "model.onnx").stat().st_size == 100
    assert cache.bytes_used == 100 and len(cache) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_new_version_replaces_the_old_whole(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, clock=Clock())
    _put(cache, "a", 100)
    model = _put(cache, "a", 30, version="v2")
    entry = cache.lookup("a")
    assert entry is not None and entry.version == {"tag": "v2"} and entry.model == model
    assert cache.bytes_used == 30 and (model / "1" / "model.onnx").stat().st_size == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_restart_keeps_entries_and_their_order_and_drops_partial_ones(tmp_path: Path) -> None:
    clock = Clock()
    cache = DiskCache(tmp_path, max_bytes=250, clock=clock)
    for key in ("a", "b", "c"):
        _put(cache, key, 100 if key != "c" else 10)
    cache.touch("a")  # order of use now: b, c, a
    cache.staging("d")  # a download the node died in
    (tmp_path / "e").mkdir()  # an entry without its manifest is no entry
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / MANIFEST).write_text("{not json")

    restarted = DiskCache(tmp_path, max_bytes=150, clock=clock)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    assert restarted.bytes_used == 210
    assert restarted.evict() == ["s3://b/b"]  # least recently used first, until it fits
    assert restarted.lookup("b") is None and not (tmp_path / "b").exists()
    assert restarted.lookup("a") is not None and restarted.evictions == 1


def test_a_manifest_pointing_outside_its_entry_is_no_entry(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, clock=Clock())
    _put(cache, "a", 10)
    manifest = tmp_path / "a" / MANIFEST
    manifest.write_text(manifest.read_text().replace('"model": "files/m"', '"model": "../../etc"'))
    assert DiskCache(tmp_path, clock=Clock()).lookup("a") is None


def test_a_pinned_entry_is_never_evicted(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=150, clock=Clock())
    _put(cache, "old", 100)
    cache.pin("old")
    cache.pin("old")
    _put(cache, "new", 100)
    assert cache.evict() == ["s3://b/new"]  # over budget: the pinned oldest stays, the next one goes
    cache.unpin("old")
    assert cache.evict() == []  # fits again
    _put(cache, "newer", 100)
    cache.unpin("old")
    assert cache.evict() == ["s3://b/old"]


def test_without_a_budget_nothing_is_evicted(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, clock=Clock())
    _put(cache, "a", 10_000)
    assert cache.evict() == [] and cache.lookup("a") is not None


def test_remove_and_discard_leave_nothing(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, clock=Clock())
    _put(cache, "a", 10)
    cache.remove("a")
    cache.discard(cache.staging("b"))
    assert list(tmp_path.iterdir()) == [] and cache.lookup("a") is None
