"""KeepAlive: refreshes from its own thread while the owner's event loop is busy; a lost lease is granted
again and handed to the owner on the owner's loop."""

from __future__ import annotations

import asyncio
import threading

from meshnode.etcd.keepalive import KeepAlive
from meshnode.etcd.types import Lease
from tests.unit.meshnode.fakes import WAIT_S


class Leases:
    """Lease calls as etcd answers them; `expired` makes the next refresh find the lease gone."""

    def __init__(self) -> None:
        self.refreshes = 0
        self.expired = False
        self.revoked: list[Lease] = []
        self.fifth = asyncio.Event()  # set at the fifth refresh

    async def refresh_lease(self, lease: Lease) -> int:
        self.refreshes += 1
        if self.refreshes == 5:
            self.fifth.set()
        return 0 if self.expired else lease.ttl

    async def grant_lease(self, ttl: int) -> Lease:
        self.expired = False
        return Lease(2, ttl)

    async def revoke_lease(self, lease: Lease) -> None:
        self.revoked.append(lease)

    async def close(self) -> None:
        pass


async def test_refreshes_go_on_at_their_interval_beside_other_work_until_stopped() -> None:
    leases = Leases()
    keeper = KeepAlive(leases, lambda: leases, Lease(1, 3), 0.01, None)
    await asyncio.wait_for(leases.fifth.wait(), WAIT_S)
    await keeper.stop()  # returns once its task has ended: no refresh can follow
    assert leases.refreshes == keeper.refreshes >= 5 and leases.revoked == []


async def test_a_lost_lease_is_granted_again_and_handed_over_on_the_owners_loop() -> None:
    leases = Leases()
    handed: list[tuple[Lease, int]] = []
    lost = asyncio.Event()

    async def on_lost(lease: Lease) -> None:
        handed.append((lease, threading.get_ident()))
        lost.set()

    keeper = KeepAlive(leases, lambda: leases, Lease(1, 3), 0.01, on_lost)
    leases.expired = True
    await asyncio.wait_for(lost.wait(), WAIT_S)
    assert handed == [(Lease(2, 3), threading.get_ident())] and keeper.lease == Lease(2, 3)
    await keeper.stop(revoke=True)
    assert leases.revoked == [Lease(2, 3)]
