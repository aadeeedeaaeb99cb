"""Requests waiting for a copy on this node: bounded, and timed for the queue-delay metric.

A copy runs `runs_per_copy` requests at once (the runtime's workers); requests for it beyond those wait,
as do requests waiting for its load. At most `max_queued` wait per copy: the dataplane checks a loaded
copy on its hit path (one compare of `entry.inflight`), `wait_for_load` checks a loading one, and both
refuse with router.errors.Overloaded. A run slot's wait is timed on the assumption that slots go to the
oldest waiting request (the runtime's queue is first in, first out), so no lock or timer is on the path.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from meshnode.observability.metrics import NodeMetrics
from meshnode.serving.entries import CachedModel
from router.errors import Overloaded


class CopyQueues:
    def __init__(self, metrics: NodeMetrics, *, runs_per_copy: int, max_queued: int) -> None:
        self._metrics = metrics
        # Requests one copy runs at once, and how many more may wait for it (its load or a run slot).
        self.runs_per_copy = runs_per_copy
        self.max_queued = max_queued
        self.queued = 0  # requests waiting here now, every copy's: a gauge
        self._load_waiters: dict[CachedModel, int] = {}  # loading entries with requests waiting on them
        # Loaded entries with requests waiting for a run slot: their arrival times, oldest first. An entry is
        # here only while it has some; len == max(0, entry.inflight - runs_per_copy).
        self._slot_waiters: dict[CachedModel, deque[float]] = {}

    async def wait_for_load(self, entry: CachedModel) -> None:
        """Wait for the entry's load among at most `max_queued` requests; past that, Overloaded at once."""
        assert entry.loaded is not None
        waiting = self._load_waiters.get(entry, 0)
        if waiting >= self.max_queued:
            raise Overloaded(f"model '{entry.name}' has {waiting} requests waiting for its load on this node, "
                             f"its limit (--max-queued-per-model {self.max_queued})")
        self._load_waiters[entry] = waiting + 1
        self.queued += 1
        try:
            await asyncio.shield(entry.loaded)
        finally:
            self.queued -= 1
            left = self._load_waiters[entry] - 1
            if left:
                self._load_waiters[entry] = left
            else:
                del self._load_waiters[entry]

    def admitted(self, entry: CachedModel, arrived: float, waited_for_load: bool) -> None:
        """A request acquired the loaded entry, before it is counted in entry.inflight: it waits for a run
        slot, or it ran without waiting (beyond its load, if it waited for one)."""
        if entry.inflight >= self.runs_per_copy:
            self.wait_for_slot(entry, arrived)
        elif waited_for_load:
            self._metrics.observe_queue_delay_ms((time.perf_counter() - arrived) * 1000.0)
        else:
            self._metrics.ran_without_waiting += 1

    def wait_for_slot(self, entry: CachedModel, arrived: float) -> None:
        """A request admitted to a loaded copy whose run slots are all taken (entry.inflight >= runs_per_copy),
        before it is counted in entry.inflight; `arrived` is its time.perf_counter() on arrival."""
        waiting = self._slot_waiters.get(entry)
        if waiting is None:
            waiting = self._slot_waiters[entry] = deque()
        waiting.append(arrived)
        self.queued += 1

    def slot_freed(self, entry: CachedModel) -> None:
        waiting = self._slot_waiters.get(entry)
        if not waiting:  # admitted past the dataplane's and acquire's bookkeeping: nothing to time
            return
        arrived = waiting.popleft()
        if not waiting:
            del self._slot_waiters[entry]
        self.queued -= 1
        self._metrics.observe_queue_delay_ms((time.perf_counter() - arrived) * 1000.0)
