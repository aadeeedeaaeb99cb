"""Lease keep-alive as a task of its own, with an etcd connection of its own.

A node's lease is what keeps it in the mesh: if its refresh waits behind start-up work (listing 100,000
records) or a burst of requests, peers see the node leave although it never stopped. So the refresh has a
gRPC channel of its own (no queue behind other etcd calls), and start-up work yields between pages.
It runs on the node's event loop, not a thread of its own: a second grpc.aio loop in another thread made
every request cost a quarter more CPU (bench.node_vs_floor: 1.37x the floor's CPU per request, 1.12x
without), as grpc's poller hands each completion across threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from meshnode.etcd.types import EtcdUnavailable, Lease

log = logging.getLogger(__name__)


class LeaseCalls(Protocol):
    """The lease calls of a store (meshnode.etcd.store.EtcdStore), usable only on the loop that made it."""

    async def refresh_lease(self, lease: Lease) -> int: ...
    async def grant_lease(self, ttl: int) -> Lease: ...
    async def revoke_lease(self, lease: Lease) -> None: ...
    async def close(self) -> None: ...


class KeepAlive:
    """Refreshes a lease every `interval` seconds, as a task of its own, until stopped.

    If the lease expired anyway (etcd unreachable for longer than the TTL, or the lease revoked), a new
    lease with the same TTL is granted, becomes `.lease`, and is passed to on_lost, which runs on the
    owner's event loop so the owner can put its keys again; on_lost is retried on the next round until it
    succeeds. `refreshes` counts the refreshes etcd answered.
    """

    def __init__(
        self,
        owner: LeaseCalls,
        connect: Callable[[], LeaseCalls],
        lease: Lease,
        interval: float,
        on_lost: Callable[[Lease], Awaitable[None]] | None,
    ) -> None:
        """owner: the store on the caller's loop (revokes at stop); connect: makes the keep-alive's own store."""
        self.lease = lease
        self.refreshes = 0
        self._owner, self._connect = owner, connect
        self._interval, self._on_lost = interval, on_lost
        self._stopping = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"etcd-keepalive-{lease.id:x}")

    async def _run(self) -> None:
        store = self._connect()
        lost = False
        try:
            while True:
                try:
                    await asyncio.wait_for(self._stopping.wait(), self._interval)
                    return
                except TimeoutError:
                    pass
                try:
                    if await store.refresh_lease(self.lease) <= 0:
                        log.warning("etcd lease %x expired; granting a new one", self.lease.id)
                        self.lease = await store.grant_lease(self.lease.ttl)
                        lost = True
                    else:
                        self.refreshes += 1
                    if lost and self._on_lost is not None:
                        await self._on_lost(self.lease)
                    lost = False
                except EtcdUnavailable as e:
                    log.warning("etcd lease %x not refreshed: %s", self.lease.id, e)
                except Exception:
                    log.exception("etcd lease %x keep-alive round failed", self.lease.id)
        finally:
            await store.close()

    async def stop(self, revoke: bool = False) -> None:
        """Stop refreshing; revoke=True also deletes the lease's keys now instead of after the TTL."""
        self._stopping.set()
        await self._task
        if revoke:
            try:
                await self._owner.revoke_lease(self.lease)
            except EtcdUnavailable as e:
                log.warning("etcd lease %x not revoked, its keys go in %d s: %s", self.lease.id, self.lease.ttl, e)
