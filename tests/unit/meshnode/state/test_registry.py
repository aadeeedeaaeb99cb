"""The registry's compact view: records unused are held as JSON and read lazily; records in use are decoded
once; bulk registration in transactions; local writes win over older watch events."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping

import pytest

from meshnode.state.registry import BATCH, ModelRecord, Registry
from tests.unit.meshnode.fake_etcd import FakeStore


def record(name: str, **fields: object) -> ModelRecord:
    given = {"storage": f"/models/{name}", "registered_at": 1.0, "updated_at": 1.0, "runtime": "onnxruntime"}
    return ModelRecord(name=name, **(given | fields))  # type: ignore[arg-type]


@pytest.fixture
async def store() -> FakeStore:
    return FakeStore()


async def started(store: FakeStore) -> Registry:
    registry = Registry(store.etcd)
    await registry.start()
    return registry


def test_json_leaves_defaults_out_and_reads_them_back() -> None:
    plain = record("m")
    assert json.loads(plain.to_json()) == {"name": "m", "storage": "/models/m", "registered_at": 1.0,
                                           "updated_at": 1.0, "runtime": "onnxruntime"}
    odd = record("m", enabled=False, min_copies=0, generation=1, extra={"owner": "a"})
    data = json.loads(odd.to_json())
    assert data["enabled"] is False and data["min_copies"] == 0 and data["owner"] == "a"
    assert ModelRecord.from_json(odd.to_json()) == odd and ModelRecord.from_json(plain.to_json()) == plain



def test_a_config_override_is_kept_in_the_record_as_given_and_left_out_when_none() -> None:
    overridden = record("m", config_override='{"max_batch_size":"16"}')
    assert json.loads(overridden.to_json())["config_override"] == '{"max_batch_size":"16"}'
    assert ModelRecord.from_json(overridden.to_json()) == overridden
    assert lazily(overridden.to_json()).config_override == '{"max_batch_size":"16"}'
    assert "config_override" not in json.loads(record("m").to_json())

def lazily(raw: bytes) -> ModelRecord:
    """Model "m" of JSON `raw` as the registry's view holds and hands it out when nobody uses it."""
    holding = Registry(FakeStore().etcd)._holding
    held = holding.held("m", raw)
    assert type(held) is bytes and len(held) < len(raw)
    return holding.opened("m", held)


def test_a_lazy_record_reads_absent_fields_as_defaults_and_parses_only_for_present_ones() -> None:
    odd = record("m", pinned=True, extra={"owner": "a"})
    read = lazily(odd.to_json())
    assert isinstance(read, ModelRecord) and read.name == "m"
    assert read.copies == {} and read.enabled is True and "_raw" in vars(read)  # nothing parsed yet
    assert read.pinned is True and "_raw" not in vars(read)  # a field present in the JSON: parsed once
    assert read == odd and odd == read and read.extra == {"owner": "a"}
    changed = dataclasses.replace(read, enabled=False)
    assert changed.enabled is False and changed.pinned is True and changed.storage == "/models/m"
    assert ModelRecord.from_json(changed.to_json()) == changed


def test_a_lazy_record_of_a_malformed_json_reads_as_defaults() -> None:
    broken = lazily(b'{"name":"m","pinned":}')
    assert broken.pinned is False and broken.copies == {} and broken.storage is None


async def test_unused_records_are_held_as_json_and_used_ones_decoded(store: FakeStore) -> None:
    store._write("models/idle", record("idle").to_json())
    used = record("used", copies={"n1": {"state": "LOADED", "since": 2.0}})
    store._write("models/used", used.to_json())
    # An older node's record with every default spelt out: shrunk to the compact form.
    spelt = json.dumps({**json.loads(record("old").to_json()), "copies": {}, "pinned": False}).encode()
    store._write("models/old", spelt)
    store._write("models/bad", b"not json")
    registry = await started(store)
    held = registry._watched.view
    assert type(held["idle"]) is bytes and type(held["old"]) is bytes and len(held["old"]) < len(spelt)
    assert type(held["used"]) is ModelRecord and "bad" not in held
    assert registry.view.get("used") is registry.view.get("used") is held["used"]
    assert registry.get("idle") == record("idle") and registry.get("old") == record("old")
    assert sorted(r.name for r in registry.records()) == ["idle", "old", "used"]
    assert "idle" in registry.view and len(registry.view) == 3 and registry.view.get("gone") is None
    await registry.stop()


async def test_a_record_gaining_copies_is_decoded_and_losing_them_compacted_again(store: FakeStore) -> None:
    registry = await started(store)
    assert await registry.register_if_absent(record("m"))
    held = registry._watched.view
    assert type(held["m"]) is bytes
    await registry.update("m", lambda r: dataclasses.replace(r, copies={"n1": {"state": "LOADED", "since": 1.0}})
                          if r else None)
    assert isinstance(held["m"], ModelRecord)
    await registry.update("m", lambda r: dataclasses.replace(r, copies={}) if r else None)
    assert type(held["m"]) is bytes
    await store.settle()
    assert type(held["m"]) is bytes and registry.get("m").copies == {}  # type: ignore[union-attr,unused-ignore]
    await registry.stop()


async def test_listeners_hear_lazy_records_without_parsing_them(store: FakeStore) -> None:
    for i in range(3):
        store._write(f"models/m{i}", record(f"m{i}").to_json())
    registry = Registry(store.etcd)
    heard: list[tuple[str, bool]] = []
    registry.add_listener(lambda name, r: heard.append((name, r is not None and r.enabled)))
    await registry.start()
    assert heard == [("m0", True), ("m1", True), ("m2", True)]
    assert all(type(v) is bytes for v in registry._watched.view.values())
    await registry.stop()


async def test_register_all_writes_batches_and_skips_what_another_node_registered(store: FakeStore) -> None:
    registry = await started(store)
    other = await started(store)
    assert await other.register_if_absent(record("m0005", size_hint=7))
    writes = store.writes
    records = [record(f"m{i:04d}") for i in range(2 * BATCH + 10)]
    assert await registry.register_all(records) == len(records) - 1
    # Three batches, and the one holding m0005 split down to it: a handful of writes, not one per model.
    assert store.writes - writes < 20
    assert registry.get("m0005").size_hint == 7  # type: ignore[union-attr]
    await store.settle()
    assert len(registry.view) == len(other.view) == len(records)
    assert await registry.register_all(records) == 0
    await registry.stop()
    await other.stop()


async def test_a_batch_another_node_registered_meanwhile_costs_one_transaction_not_one_per_record(
        store: FakeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = await started(store)
    other = await started(store)
    records = [record(f"m{i:04d}") for i in range(BATCH)]
    assert await other.register_all(records[:BATCH // 2]) == BATCH // 2
    await store.settle()  # the watch brought them to this node's view
    transactions: list[int] = []
    commit = store.commit

    async def counted(puts: Mapping[str, object], unchanged: Mapping[str, int]) -> int | None:
        transactions.append(len(puts))
        return await commit(puts, unchanged)

    monkeypatch.setattr(store, "commit", counted)
    assert await registry.register_all(records) == BATCH // 2
    assert transactions == [BATCH, BATCH // 2]  # the batch refused, then the rest of it
    await registry.stop()
    await other.stop()


async def test_expected_records_are_read_and_their_first_update_registers_them(store: FakeStore) -> None:
    registry = await started(store)
    registry.expect(lambda name: record(name) if name.startswith("repo-") else None)
    assert registry.get("repo-a") == record("repo-a") and registry.get("other") is None
    assert "repo-a" not in registry.view and "models/repo-a" not in store.data
    await registry.update("repo-a", lambda r: dataclasses.replace(r, pinned=True) if r else None)
    assert store.record("models/repo-a")["pinned"] is True
    assert await registry.update("repo-b", lambda r: r) is None  # no change: nothing written, etcd has none
    assert "models/repo-b" not in store.data
    registry.expect(None)
    assert registry.get("repo-b") is None and registry.get("repo-a").pinned is True  # type: ignore[union-attr]
    await registry.stop()


async def test_a_local_write_is_not_undone_by_an_older_watch_event(store: FakeStore) -> None:
    registry = await started(store)
    assert await registry.register_if_absent(record("m"))
    await registry.update("m", lambda r: dataclasses.replace(r, pinned=True) if r else None)
    assert registry.get("m").pinned is True  # type: ignore[union-attr]  # before the watch saw either write
    await store.settle()
    assert registry.get("m").pinned is True  # type: ignore[union-attr]
    assert registry._watched._pending == {}  # nothing remembered once the watch is past
    await registry.stop()


def test_an_unused_record_takes_a_few_hundred_bytes_in_the_view() -> None:
    raw = record("m0012345", storage="/srv/models/repository/m0012345").to_json()
    assert sys.getsizeof(raw) < 200


async def test_idle_records_are_the_recently_used_and_the_first_never_used_without_copies(store: FakeStore) -> None:
    writes = {
        "z-recent": record("z-recent", last_used=100.0), "y-old": record("y-old", last_used=10.0),
        "b": record("b"), "a": record("a"), "c": record("c"), "a-off": record("a-off", enabled=False),
        "a-held": record("a-held", copies={"n1": {"state": "LOADED", "since": 1.0}}),
        "a-failed": record("a-failed", failures={"n1": {"at": 1.0, "message": "corrupt"}}),
    }
    for name, r in writes.items():
        store._write(f"models/{name}", r.to_json())
    registry = await started(store)
    idle = registry.records_idle(used_after=50.0, never_used=2)
    assert sorted(r.name for r in idle) == ["a", "a-failed", "b", "z-recent"]
    assert [r.name for r in registry.records_idle(used_after=50.0, never_used=0)] == ["a-failed", "z-recent"]
    await registry.stop()


def test_held_records_drop_their_name_field_names_and_the_usual_directory_and_read_back_whole() -> None:
    holding = Registry(FakeStore().etcd)._holding
    usual = [record(f"m{i}", storage=f"/srv/models/m{i}", last_used=5.0) for i in range(2)]
    elsewhere = record("x", storage="/other/place/x")
    quoted = record('we"ird', storage='/srv/models/we"ird')
    for r in [*usual, elsewhere, quoted]:
        held = holding.held(r.name, r.to_json())
        assert held is not None and holding.opened(r.name, held) == r
    assert all(len(holding.held(r.name, r.to_json())) < 45 for r in usual)  # type: ignore[arg-type]
    assert b"/srv/models" not in holding.held("m1", usual[1].to_json())  # type: ignore[operator]
    assert b"/other/place" in holding.held("x", elsewhere.to_json())  # type: ignore[operator]
