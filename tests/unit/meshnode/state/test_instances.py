"""The instance record's publisher: what a peer's placement must know soon is written within min_interval_s;
load that only drifts with the traffic, at most every drift_interval_s."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import cast

from meshnode.etcd.store import EtcdStore
from meshnode.etcd.types import Lease
from meshnode.state.instances import InstancePublisher, load_drifted, state_changed
from placement.types import NodeView
from tests.unit.meshnode.fakes import NOW, WAIT_S, ManualClock, node_view

BASE = dataclasses.replace(node_view("me"), lru_time_s=NOW - 100, request_rate=100.0, inflight=8)


def test_what_the_node_is_is_state_and_what_traffic_moves_is_drift() -> None:
    busier = dataclasses.replace(BASE, request_rate=400.0, inflight=40)
    assert load_drifted(BASE, busier, NOW) and not state_changed(BASE, busier)
    for change in ({"shutting_down": True}, {"model_count": 3}, {"runtime_down": True}, {"used_bytes": 9_000}):
        assert state_changed(BASE, dataclasses.replace(BASE, **change))
    assert not load_drifted(BASE, dataclasses.replace(BASE, request_rate=120.0, inflight=9), NOW)


class Store:
    """The store calls the publisher makes: every put recorded."""

    def __init__(self) -> None:
        self.puts: list[NodeView] = []
        self.published = asyncio.Event()

    async def grant_lease(self, ttl: int) -> Lease:
        return Lease(1, ttl)

    def keep_alive(self, lease: Lease, on_lost: object) -> Store:
        return self

    async def stop(self, revoke: bool = False) -> None:
        pass

    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        self.puts.append(current[0])
        self.published.set()
        return len(self.puts)


current = [BASE]
looked = [0]  # how many times the publisher looked at the node's state: its rounds


def view() -> NodeView:
    looked[0] += 1
    return current[0]


async def rounds(count: int) -> None:
    until = looked[0] + count
    async with asyncio.timeout(WAIT_S):
        while looked[0] < until:  # noqa: ASYNC110 - a counter, no event to wait on
            await asyncio.sleep(0)


async def published(store: Store) -> NodeView:
    store.published.clear()
    await asyncio.wait_for(store.published.wait(), WAIT_S)
    return store.puts[-1]


async def test_drift_waits_for_its_interval_and_a_state_change_does_not() -> None:
    store, clock = Store(), ManualClock()
    current[0] = BASE
    publisher = InstancePublisher(cast(EtcdStore, store), view, check_interval_s=0.001,
                                  min_interval_s=1.0, drift_interval_s=5.0, clock=clock)
    await publisher.start()
    try:
        assert store.puts == [BASE]
        current[0] = dataclasses.replace(BASE, request_rate=400.0)
        clock.advance(1.5)  # past min_interval_s: a state change would go now, drift waits
        await rounds(5)
        assert store.puts == [BASE]
        draining = dataclasses.replace(current[0], shutting_down=True)
        clock.advance(3.5)  # 5 s since the last write: the drift goes
        assert (await published(store)).request_rate == 400.0 and len(store.puts) == 2
        current[0] = draining
        clock.advance(1.0)
        assert (await published(store)).shutting_down and len(store.puts) == 3
    finally:
        await publisher.stop()
