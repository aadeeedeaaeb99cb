"""A priority queue in front of the runtime's loads: at most `concurrency` run at once.

Loads a request waits for go first; background loads (extra copies, proactive loads, drain
hand-offs) follow, most recently used first. A load's timeout starts when it leaves the
queue, so a long queue never times out a load that has not begun.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

FOR_REQUEST = 0
BACKGROUND = 1


def priority(waiting: bool, last_used: float | None) -> tuple[int, float]:
    return (FOR_REQUEST if waiting else BACKGROUND, -(last_used or 0.0))


class LoadQueue:
    def __init__(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError("load concurrency must be at least 1")
        self.concurrency = concurrency
        self.running = 0
        self._waiting: list[tuple[tuple[int, float], int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def run(self, rank: tuple[int, float], job: Callable[[], Awaitable[T]]) -> T:
        """Wait for a slot in `rank` order (lowest first), then run `job` in it."""
        if self.running >= self.concurrency or self._waiting:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (rank, next(self._order), turn))
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()  # the slot was handed to us as we were cancelled: pass it on
                raise
        else:
            self.running += 1
        try:
            return await job()
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            _, _, turn = heapq.heappop(self._waiting)
            if not turn.done():
                turn.set_result(None)  # the slot passes straight to the next waiter
                return
        self.running -= 1
