"""EtcdStore against a real etcd server: CAS under contention, paging, watches, leases, outages."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from unittest.mock import ANY

import pytest

from meshnode.etcd.store import EtcdStore, EtcdUnavailable, Lease, WatchEvent, WatchResync
from meshnode.local.etcd import EtcdProcess
from tests.integration.helpers import wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def store(etcd: EtcdProcess, etcd_prefix: str) -> AsyncIterator[EtcdStore]:
    s = await EtcdStore.connect(etcd.endpoint, etcd_prefix)
    yield s
    await s.close()


def increment(raw: bytes | None) -> bytes:
    return str(int(raw or b"0") + 1).encode()


async def collect(store: EtcdStore, prefix: str, start: int, into: list[WatchEvent]) -> None:
    async for ev in store.watch_prefix(prefix, start):
        into.append(ev)


async def test_get_put_delete_and_json(store: EtcdStore) -> None:
    assert await store.get("a") is None
    r1 = await store.put("a", b"one")
    assert await store.get("a") == (b"one", r1)
    r2 = await store.put("b", {"x": [1, 2]})
    assert r2 > r1
    got = await store.get("b")
    assert got is not None and json.loads(got[0]) == {"x": [1, 2]}
    assert await store.delete("a") is not None
    assert await store.delete("a") is None
    assert await store.get("a") is None


async def test_create_and_compare_operations(store: EtcdStore) -> None:
    r1 = await store.create("k", b"v1")
    assert r1 is not None
    assert await store.create("k", b"other") is None
    assert await store.compare_and_put("k", b"v2", r1 - 1) is None
    r2 = await store.compare_and_put("k", b"v2", r1)
    assert r2 is not None and await store.get("k") == (b"v2", r2)
    assert await store.delete("k") is not None
    assert await store.get("k") is None
    assert await store.compare_and_put("k", b"v3", 0) is not None  # 0: only while absent


async def test_update_skips_identical_and_deletes_on_none(store: EtcdStore) -> None:
    assert await store.update("u", lambda raw: raw) is None  # absent, left absent
    assert await store.update("u", lambda raw: b"x") == b"x"
    before = await store.get("u")
    assert before is not None
    assert await store.update("u", lambda raw: raw) == b"x"
    assert await store.get("u") == before  # no write happened
    value, revision = await store.update_versioned("u", lambda raw: None)
    assert value is None and revision > before[1]
    assert await store.get("u") is None


async def test_concurrent_updaters_lose_nothing(etcd: EtcdProcess, etcd_prefix: str) -> None:
    a = await EtcdStore.connect(etcd.endpoint, etcd_prefix)
    b = await EtcdStore.connect(etcd.endpoint, etcd_prefix)
    try:

        async def fifty(s: EtcdStore) -> None:
            for _ in range(50):
                await s.update("counter", increment)

        await asyncio.gather(fifty(a), fifty(b))
        assert await a.get("counter") == (b"100", ANY)

        # Every increment at once: 2 stores x 100 concurrent tasks.
        await asyncio.gather(*(s.update("c2", increment) for s in (a, b) for _ in range(100)))
        assert await b.get("c2") == (b"200", ANY)
    finally:
        await a.close()
        await b.close()


async def test_list_pages_over_many_keys(store: EtcdStore) -> None:
    n = 2500  # three pages of 1000
    for start in range(0, n, 250):
        await asyncio.gather(*(store.put(f"m/{i:05d}", str(i).encode()) for i in range(start, start + 250)))
    await store.put("mx", b"sibling, not under m/")
    entries, revision = await store.snapshot_prefix("m/")
    assert [e.key for e in entries] == [f"m/{i:05d}" for i in range(n)]
    assert all(e.value == str(int(e.key[2:])).encode() for e in entries)
    assert revision >= max(e.mod_revision for e in entries)


async def test_watch_sees_puts_and_deletes_after_listing(store: EtcdStore) -> None:
    await store.put("w/before", b"0")
    entries, revision = await store.snapshot_prefix("w/")
    assert [e.key for e in entries] == ["w/before"]
    # Written between the listing and the watch's start: must still be seen.
    r_gap = await store.put("w/gap", b"1")
    events: list[WatchEvent] = []
    task = asyncio.create_task(collect(store, "w/", revision + 1, events))
    try:
        await store.put("w/x", b"2")
        await store.put("other", b"not watched")
        r_del = await store.delete("w/x")
        await wait_until(lambda: len(events) == 3, 5, "the watch to report the gap's put, a put and a delete")
        assert [(e.type, e.key, e.value) for e in events] == [
            ("put", "w/gap", b"1"),
            ("put", "w/x", b"2"),
            ("delete", "w/x", b""),
        ]
        assert events[0].mod_revision == r_gap and events[2].mod_revision == r_del
    finally:
        task.cancel()


@pytest.mark.timeout(30)
async def test_lease_expires_after_keep_alive_stops(store: EtcdStore) -> None:
    lease = await store.grant_lease(1)
    await store.put("leased", b"alive", lease=lease)
    keeper = store.keep_alive(lease, interval=0.3)
    await asyncio.sleep(2.5)  # well past the TTL: only the keep-alive holds it
    assert await store.get("leased") is not None
    await keeper.stop()

    async def expired() -> bool:
        return await store.get("leased") is None

    await wait_until(expired, 5, "the leased key to go with its lease")
    assert await store.refresh_lease(lease) == 0


async def test_keep_alive_regrants_a_lost_lease(store: EtcdStore) -> None:
    lease = await store.grant_lease(2)
    await store.put("node", b"me", lease=lease)
    regranted: list[Lease] = []

    async def on_lost(new: Lease) -> None:
        regranted.append(new)
        await store.put("node", b"me", lease=new)

    keeper = store.keep_alive(lease, interval=0.2, on_lost=on_lost)
    try:
        await store.revoke_lease(lease)  # as if it had expired while etcd was unreachable
        await wait_until(lambda: bool(regranted), 5, "the keep-alive to regrant the revoked lease")
        assert keeper.lease == regranted[0] and keeper.lease.id != lease.id
        assert await store.get("node") is not None
    finally:
        await keeper.stop(revoke=True)
    assert await store.get("node") is None


async def test_connect_to_nothing_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(EtcdUnavailable):
        await EtcdStore.connect("127.0.0.1:1", "p", retry_window=0.5)
    assert time.monotonic() - started < 3


async def test_operations_across_an_etcd_restart(private_etcd: EtcdProcess, etcd_prefix: str) -> None:
    s = await EtcdStore.connect(private_etcd.endpoint, etcd_prefix)
    impatient = await EtcdStore.connect(private_etcd.endpoint, etcd_prefix, retry_window=0.5)
    lease = await s.grant_lease(2)
    await s.put("leased", b"x", lease=lease)
    lost: list[Lease] = []

    async def on_lost(new: Lease) -> None:
        lost.append(new)

    keeper = s.keep_alive(lease, interval=0.5, on_lost=on_lost)
    await s.put("r/1", b"before")
    _, revision = await s.snapshot_prefix("r/")
    events: list[WatchEvent] = []
    watch = asyncio.create_task(collect(s, "r/", 1, events))
    try:
        await wait_until(lambda: len(events) == 1, 5, "the watch to report r/1")
        restart = asyncio.create_task(asyncio.to_thread(private_etcd.restart_after, 3.0))
        await wait_until(lambda: not private_etcd.running, 5, "etcd to stop")

        started = time.monotonic()
        with pytest.raises(EtcdUnavailable):
            await impatient.get("r/1")
        assert time.monotonic() - started < 2

        # Started during the outage, finishes once etcd is back (3 s < retry window of 5 s).
        assert await s.update("r/2", lambda raw: b"during") == b"during"
        await restart
        await s.put("r/3", b"after")
        await wait_until(lambda: len(events) == 3, 5, "the watch to report r/2 and r/3 after the restart")
        assert [(e.type, e.key) for e in events] == [("put", "r/1"), ("put", "r/2"), ("put", "r/3")]
        assert (await impatient.get("r/2")) is not None
        # etcd renews leases when it restarts: a short outage costs no lease.
        since = keeper.refreshes  # two keep-alive rounds more: a lost lease would have been reported by then
        await wait_until(lambda: keeper.refreshes >= since + 2, 5, "two more keep-alive refreshes after the restart")
        assert await s.get("leased") is not None and not lost
        assert keeper.lease == lease
    finally:
        watch.cancel()
        await keeper.stop()
        await s.close()
        await impatient.close()


async def test_watch_reports_etcd_data_loss(private_etcd: EtcdProcess, etcd_prefix: str) -> None:
    s = await EtcdStore.connect(private_etcd.endpoint, etcd_prefix)
    try:
        _, revision = await s.snapshot_prefix("d/")
        events: list[WatchEvent] = []
        watch = asyncio.create_task(collect(s, "d/", revision + 1, events))
        # Writes the watch never sees (another prefix): only the store's revisions reveal the loss.
        for i in range(5):
            await s.put(f"elsewhere/{i}", b"x")
        await asyncio.to_thread(private_etcd.stop)  # data removed
        await asyncio.to_thread(private_etcd.start_again)
        with pytest.raises(WatchResync):
            await asyncio.wait_for(watch, 10)
        assert events == []
        # Once reported, the new history is accepted: a fresh watch works.
        _, revision = await s.snapshot_prefix("d/")
        watch = asyncio.create_task(collect(s, "d/", revision + 1, events))
        await s.put("d/new", b"1")
        await wait_until(lambda: len(events) == 1, 5, "the fresh watch to report d/new")
        watch.cancel()
    finally:
        await s.close()


async def test_commit_writes_all_keys_only_when_every_check_holds(store: EtcdStore) -> None:
    assert await store.commit({"alias": b"m1"}, unchanged={"alias": 0}, present=["model"]) is None  # no model
    await store.put("model", b"x")
    first = await store.commit({"alias": b"m1", "other": b"o"}, unchanged={"alias": 0}, present=["model"])
    assert first is not None
    assert await store.get("alias") == (b"m1", first) and await store.get("other") == (b"o", first)
    assert await store.commit({"alias": b"m2"}, unchanged={"alias": first - 1}) is None  # stale revision
    second = await store.commit({"alias": b"m2"}, unchanged={"alias": first})
    assert second is not None and (await store.get("alias")) == (b"m2", second)
