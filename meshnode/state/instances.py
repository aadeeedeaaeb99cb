"""This node's instance record in etcd: on a lease, republished only when it changed enough.

The record is what other nodes' placement sees (capacity, use, cache age, load). Writes are
bounded by `min_interval_s` whatever the request rate, and skipped while nothing changed that
would alter a placement decision. What only drifts with the traffic (request rate, in-flight count,
cache age) is written at most every `drift_interval_s`, so steady load costs etcd almost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable

from meshnode.background import cancel_and_wait
from meshnode.etcd.store import EtcdStore, KeepAlive
from meshnode.etcd.types import EtcdError, Lease
from placement.types import NodeView

log = logging.getLogger(__name__)

PREFIX = "instances/"
LEASE_TTL_S = 5  # a killed node leaves routing within this; heartbeats every TTL/3


def encode_node(view: NodeView) -> bytes:
    return json.dumps(dataclasses.asdict(view), separators=(",", ":")).encode()


def decode_node(instance_id: str, raw: bytes) -> NodeView | None:
    try:
        data = json.loads(raw)
        known = {f.name for f in dataclasses.fields(NodeView)}
        return NodeView(**{k: v for k, v in data.items() if k in known} | {"instance_id": instance_id})
    except (ValueError, TypeError) as error:
        log.warning("ignoring malformed instance record %r: %s", instance_id, error)
        return None


def state_changed(old: NodeView, new: NodeView) -> bool:
    """A change of what the node is or holds: another node would decide differently, so it must know soon.
    Thresholds here and in load_drifted after ModelMesh's, tighter where cheap."""
    if old.shutting_down != new.shutting_down or old.runtime_down != new.runtime_down or old.endpoint != new.endpoint:
        return True
    if old.capacity_bytes != new.capacity_bytes or (old.loads_in_progress > 0) != (new.loads_in_progress > 0):
        return True
    if abs(new.used_bytes - old.used_bytes) > 0.05 * max(1, new.capacity_bytes):
        return True
    if (old.free_bytes <= 0) != (new.free_bytes <= 0) or old.model_count != new.model_count:
        return True
    return (old.lru_time_s is None) != (new.lru_time_s is None)


def load_drifted(old: NodeView, new: NodeView, now: float) -> bool:
    """Traffic moved the node's load or cache age by a step that placement would weigh differently."""
    if old.lru_time_s is not None and new.lru_time_s is not None:
        moved = abs(new.lru_time_s - old.lru_time_s)
        if moved >= 20.0 and moved > new.cache_age_s(now) / 16:
            return True
    # Load matters to placement only in coarse steps (busy_factor 2): halving or doubling, not drift.
    if abs(new.request_rate - old.request_rate) > max(5.0, 0.5 * old.request_rate):
        return True
    return abs(new.inflight - old.inflight) > max(4, old.inflight // 2)


class InstancePublisher:
    def __init__(
        self, store: EtcdStore, current: Callable[[], NodeView], *, lease_ttl_s: int = LEASE_TTL_S,
        check_interval_s: float = 0.25, min_interval_s: float = 1.0, drift_interval_s: float = 5.0,
        max_silence_s: float = 60.0, clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._current = current
        self._ttl = lease_ttl_s
        self._check = check_interval_s
        self._min_interval = min_interval_s
        self._drift_interval = drift_interval_s
        self._max_silence = max_silence_s
        self._now = clock
        self._lease: Lease | None = None
        self._keepalive: KeepAlive | None = None
        self._task: asyncio.Task[None] | None = None
        self._published: NodeView | None = None
        self._published_at = 0.0
        self.writes = 0

    @property
    def started(self) -> bool:
        """Whether this node has joined the mesh (and so has something to leave)."""
        return self._task is not None

    async def start(self) -> None:
        self._lease = await self._store.grant_lease(self._ttl)
        self._keepalive = self._store.keep_alive(self._lease, on_lost=self._lease_lost)
        await self._publish(self._current())
        self._task = asyncio.create_task(self._run(), name="instance-publisher")

    async def publish_now(self) -> None:
        """Something urgent changed (draining): publish it before going on."""
        try:
            await self._publish(self._current())
        except EtcdError as error:
            log.warning("instance record not published: %s", error)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._check)
            view, now = self._current(), self._now()
            last = self._published
            since = now - self._published_at
            due = last is None or since >= self._max_silence
            if not due and since < self._min_interval:
                continue
            if due or (last is not None and (state_changed(last, view) or (
                    since >= self._drift_interval and load_drifted(last, view, now)))):
                try:
                    await self._publish(view)
                except EtcdError as error:  # etcd down: keep serving, publish when it returns
                    log.warning("instance record not published: %s", error)

    async def _publish(self, view: NodeView) -> None:
        assert self._lease is not None
        await self._store.put(PREFIX + view.instance_id, encode_node(view), lease=self._lease)
        self.writes += 1
        self._published, self._published_at = view, self._now()

    async def _lease_lost(self, lease: Lease) -> None:
        # etcd forgot the old lease (down longer than the TTL); keep-alive granted `lease` for us.
        log.warning("instance record re-registered under lease %x", lease.id)
        self._lease = lease
        await self._publish(self._current())

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self._keepalive is not None:
            with contextlib.suppress(EtcdError):
                await self._keepalive.stop(revoke=True)
