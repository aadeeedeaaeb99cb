"""EtcdStore against a real etcd over mutual TLS with auth enabled: reads, writes and watches; refusals;
fail-over past a dead endpoint; a new token after etcd restarts and forgets the old one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest

from meshnode.etcd.store import EtcdAccess, EtcdError, EtcdStore, EtcdUnavailable, WatchEvent
from meshnode.local.certs import MeshCerts
from meshnode.local.etcd import EtcdProcess, EtcdTls
from meshnode.local.process import free_ports
from meshnode.net.tls import ClientTls
from tests.integration.helpers import wait_until

pytestmark = pytest.mark.timeout(60)
PASSWORD = "etcd-root-password-9d1"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> MeshCerts:
    return MeshCerts.generate(tmp_path_factory.mktemp("etcd-certs"))


@pytest.fixture(scope="module")
def secure_etcd(certs: MeshCerts) -> Iterator[EtcdProcess]:
    server = EtcdProcess.start(tls=EtcdTls(certs.etcd.cert, certs.etcd.key, certs.mesh_ca))
    try:
        server.enable_auth(PASSWORD)
        yield server
    finally:
        server.stop()


def access(etcd: EtcdProcess, certs: MeshCerts, *, endpoints: tuple[str, ...] = (), user: str | None = "root",
           password: str | None = PASSWORD, client_cert: bool = True) -> EtcdAccess:
    tls = ClientTls(certs.mesh_ca, certs.peer.cert, certs.peer.key) if client_cert else ClientTls(certs.mesh_ca)
    return EtcdAccess(endpoints or (etcd.endpoint,), tls, user, password)


@pytest.fixture
async def store(secure_etcd: EtcdProcess, certs: MeshCerts, etcd_prefix: str) -> AsyncIterator[EtcdStore]:
    s = await EtcdStore.connect(access(secure_etcd, certs), etcd_prefix)
    yield s
    await s.close()


async def collect(store: EtcdStore, into: list[WatchEvent]) -> None:
    async for event in store.watch_prefix("", 1):
        into.append(event)


async def test_reads_writes_and_watches_over_tls_with_auth(store: EtcdStore) -> None:
    events: list[WatchEvent] = []
    watch = asyncio.create_task(collect(store, events))
    try:
        revision = await store.put("a", {"x": 1})
        assert await store.get("a") == (b'{"x":1}', revision)
        await wait_until(lambda: [e.key for e in events] == ["a"], 5, "the watch to see the put")
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


@pytest.mark.parametrize("case", ["no user", "wrong password", "no client certificate"])
async def test_refused_without_the_right_credentials(secure_etcd: EtcdProcess, certs: MeshCerts,
                                                     etcd_prefix: str, case: str) -> None:
    given = {"no user": access(secure_etcd, certs, user=None, password=None),
             "wrong password": access(secure_etcd, certs, password="not-the-password"),
             "no client certificate": access(secure_etcd, certs, client_cert=False)}[case]
    expected = EtcdUnavailable if case == "no client certificate" else EtcdError
    with pytest.raises(expected):
        await EtcdStore.connect(given, etcd_prefix, retry_window=1.0)


async def test_fails_over_past_a_dead_endpoint(secure_etcd: EtcdProcess, certs: MeshCerts, etcd_prefix: str) -> None:
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    s = await EtcdStore.connect(access(secure_etcd, certs, endpoints=(dead, secure_etcd.endpoint)), etcd_prefix)
    try:
        assert await s.put("k", b"v") > 0
    finally:
        await s.close()


async def test_after_a_restart_a_new_token_is_fetched_and_the_watch_resumes(
        store: EtcdStore, secure_etcd: EtcdProcess) -> None:
    events: list[WatchEvent] = []
    watch = asyncio.create_task(collect(store, events))
    try:
        await store.put("before", b"1")
        await wait_until(lambda: len(events) == 1, 5, "the first event")
        # etcd's simple tokens live in the member's memory: the restart forgets ours.
        await asyncio.to_thread(secure_etcd.restart_after, 0.1)
        await store.put("after", b"2")
        await wait_until(lambda: [e.key for e in events] == ["before", "after"], 10, "the event after the restart")
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch

