"""Registry against a real etcd server: local view, watch convergence, CAS, restarts, persistence."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from meshnode.errors import DeadlineExceeded
from meshnode.etcd.store import EtcdStore, WatchEvent
from meshnode.local.etcd import EtcdProcess
from meshnode.state.registry import ModelRecord, Registry

pytestmark = pytest.mark.timeout(60)


async def open_registry(endpoint: str, prefix: str) -> tuple[EtcdStore, Registry]:
    store = await EtcdStore.connect(endpoint, prefix)
    registry = Registry(store)
    await registry.start()
    return store, registry


@pytest.fixture
async def pair(etcd: EtcdProcess, etcd_prefix: str) -> AsyncIterator[tuple[Registry, Registry]]:
    """Two registries on separate connections, as two nodes would have."""
    opened = [await open_registry(etcd.endpoint, etcd_prefix) for _ in range(2)]
    yield opened[0][1], opened[1][1]
    for store, registry in opened:
        await registry.stop()
        await store.close()


def record(name: str, size_hint: int | None = None, extra: dict[str, object] | None = None) -> ModelRecord:
    return ModelRecord(name=name, storage=f"/models/{name}", size_hint=size_hint, extra=extra or {})


def changed(**changes: Any) -> Callable[[ModelRecord | None], ModelRecord | None]:
    """An update fn setting fields of an existing record."""

    def fn(r: ModelRecord | None) -> ModelRecord | None:
        assert r is not None
        return dataclasses.replace(r, **changes)

    return fn


def present(r: ModelRecord | None) -> bool:
    return r is not None


def absent(r: ModelRecord | None) -> bool:
    return r is None


def test_record_json_keeps_unknown_fields() -> None:
    raw = json.dumps({"name": "m", "storage": "/x", "enabled": False, "owner": "team-a",
                      "labels": {"tier": "gold"}}).encode()
    r = ModelRecord.from_json(raw)
    assert (r.name, r.storage, r.enabled, r.size_hint, r.copies, r.failures) == ("m", "/x", False, None, {}, {})
    assert r.extra == {"owner": "team-a", "labels": {"tier": "gold"}}
    assert ModelRecord.from_json(r.to_json()) == r
    with pytest.raises(ValueError):
        ModelRecord.from_json(b'{"storage": "/x"}')


async def test_own_writes_show_at_once_and_others_converge(pair: tuple[Registry, Registry]) -> None:
    a, b = pair
    assert await a.register_if_absent(record("m1", size_hint=1000))
    assert not await b.register_if_absent(record("m1"))  # b's view may lag; etcd decides
    mine = a.get("m1")
    assert mine is not None and mine.size_hint == 1000
    seen = await b.wait_for("m1", present, timeout=5)
    assert seen == a.get("m1")

    failures = {"n1": {"at": 1.0, "message": "bad onnx"}}
    updated = await b.update("m1", changed(enabled=False, failures=failures))
    assert updated is not None and not updated.enabled and updated.updated_at >= updated.registered_at
    assert b.get("m1") == updated
    await a.wait_for("m1", lambda r: r is not None and not r.enabled, timeout=5)
    assert a.get("m1") == updated

    assert await a.delete("m1")
    assert a.get("m1") is None
    assert not await a.delete("m1")
    await b.wait_for("m1", absent, timeout=5)
    assert b.names() == [] and b.records() == []


async def test_listeners_hear_disable_and_unregister(pair: tuple[Registry, Registry]) -> None:
    a, b = pair
    heard: list[tuple[str, bool | None]] = []
    b.add_listener(lambda name, r: heard.append((name, None if r is None else r.enabled)))
    assert await a.register_if_absent(record("m"))
    await b.wait_for("m", present, timeout=5)
    await a.update("m", changed(enabled=False))
    await b.wait_for("m", lambda r: r is not None and not r.enabled, timeout=5)
    await a.delete("m")
    await b.wait_for("m", absent, timeout=5)
    assert heard == [("m", True), ("m", False), ("m", None)]


async def test_concurrent_updates_from_two_nodes_lose_nothing(pair: tuple[Registry, Registry]) -> None:
    a, b = pair
    assert await a.register_if_absent(record("shared"))

    def add_copy(node: str) -> Callable[[ModelRecord | None], ModelRecord | None]:
        def fn(r: ModelRecord | None) -> ModelRecord | None:
            assert r is not None
            copies = dict(r.copies)
            copies[node] = {"state": "loaded", "since": 1.0}
            return dataclasses.replace(r, copies=copies)

        return fn

    await asyncio.gather(
        *(reg.update("shared", add_copy(f"{tag}{i}")) for tag, reg in (("a", a), ("b", b)) for i in range(25))
    )
    remote = (await a.read("shared"))[0]
    assert remote is not None and len(remote.copies) == 50
    await b.wait_for("shared", lambda r: r is not None and len(r.copies) == 50, timeout=5)


async def test_updates_keep_fields_of_newer_versions(pair: tuple[Registry, Registry]) -> None:
    a, _ = pair
    assert await a.register_if_absent(record("m", extra={"owner": "team-a"}))
    await a.update("m", changed(size_hint=5))  # a change by a node that does not know "owner"
    remote = (await a.read("m"))[0]
    assert remote is not None and remote.size_hint == 5 and remote.extra == {"owner": "team-a"}


async def test_older_watch_event_does_not_undo_a_newer_write(pair: tuple[Registry, Registry]) -> None:
    a, _ = pair
    assert await a.register_if_absent(record("m", size_hint=1))
    stored = await a._store.get("models/m")
    assert stored is not None
    await a.update("m", changed(size_hint=2))
    stale = WatchEvent("put", "models/m", stored[0], stored[1])
    a._watched._on_event(stale)  # as if the watch delivered the older write late
    newer = a.get("m")
    assert newer is not None and newer.size_hint == 2
    await a.delete("m")
    a._watched._on_event(stale)
    assert a.get("m") is None


async def test_wait_for_times_out(pair: tuple[Registry, Registry]) -> None:
    a, _ = pair
    with pytest.raises(DeadlineExceeded):
        await a.wait_for("never", present, timeout=0.2)


async def test_malformed_record_is_ignored(etcd: EtcdProcess, etcd_prefix: str) -> None:
    store = await EtcdStore.connect(etcd.endpoint, etcd_prefix)
    await store.put("models/bad", b"{not json")
    await store.put("models/good", record("good").to_json())
    registry = Registry(store)
    await registry.start()
    try:
        assert registry.names() == ["good"]
    finally:
        await registry.stop()
        await store.close()


async def test_view_converges_across_etcd_restart(private_etcd: EtcdProcess, etcd_prefix: str) -> None:
    s1, follower = await open_registry(private_etcd.endpoint, etcd_prefix)
    s2 = await EtcdStore.connect(private_etcd.endpoint, etcd_prefix)
    writer = Registry(s2)  # writes only, never started: no view needed
    try:
        await writer.register_if_absent(record("before"))
        await follower.wait_for("before", present, timeout=5)
        await asyncio.to_thread(private_etcd.restart_after, 3.0)
        await writer.register_if_absent(record("after"))
        await writer.delete("before")
        await follower.wait_for("after", present, timeout=10)
        await follower.wait_for("before", absent, timeout=10)
        assert follower.names() == ["after"]
    finally:
        await follower.stop()
        await s1.close()
        await s2.close()


async def test_registry_persists_across_store_and_etcd_restart(private_etcd: EtcdProcess, etcd_prefix: str) -> None:
    store, registry = await open_registry(private_etcd.endpoint, etcd_prefix)
    await registry.register_if_absent(record("kept", size_hint=42))
    await registry.stop()
    await store.close()
    await asyncio.to_thread(private_etcd.restart_after, 0.2)

    store, registry = await open_registry(private_etcd.endpoint, etcd_prefix)
    try:
        kept = registry.get("kept")
        assert kept is not None and kept.size_hint == 42 and kept.storage == "/models/kept"
    finally:
        await registry.stop()
        await store.close()


async def test_view_resyncs_after_etcd_loses_its_data(private_etcd: EtcdProcess, etcd_prefix: str) -> None:
    store, registry = await open_registry(private_etcd.endpoint, etcd_prefix)
    try:
        for i in range(3):
            await registry.register_if_absent(record(f"m{i}"))
        await asyncio.to_thread(private_etcd.stop)  # removes the data
        await asyncio.to_thread(private_etcd.start_again)
        await registry.wait_for("m0", absent, timeout=10)
        assert registry.names() == []
        other = await EtcdStore.connect(private_etcd.endpoint, etcd_prefix)
        await Registry(other).register_if_absent(record("new"))
        await other.close()
        await registry.wait_for("new", present, timeout=5)
    finally:
        await registry.stop()
        await store.close()
