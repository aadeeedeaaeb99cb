"""Tasks a component starts and does not await: referenced until done, cancellable together; work
repeated at an interval; and the one way a component stops a task of its own (cancel_and_wait).

asyncio keeps only weak references to tasks, so one nobody holds can vanish mid-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it has ended, swallowing the CancelledError that ending it raises, but
    not the caller's own: a caller cancelled while it waits (its deadline, a shutdown) is cancelled still.

    `suppress(CancelledError)` around the wait cannot tell the two apart, so a stop() awaited by a task
    being cancelled returned normally and that task ran on. The caller's own cancellation shows as its
    `cancelling()` count growing while it waited; a caller already being cancelled when it called (a stop()
    in a cleanup handler) is let finish its cleanup.
    """
    current = asyncio.current_task()
    before = current.cancelling() if current is not None else 0
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if current is not None and current.cancelling() > before:
        raise asyncio.CancelledError


class BackgroundTasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait(self) -> None:
        """Let every task finish (their errors are theirs to log)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(Exception):  # their errors are theirs to log
                await cancel_and_wait(task)


class Periodic:
    """`step()` every `interval_s` seconds until stopped; a step that fails is logged and the next one runs."""

    def __init__(self, name: str, interval_s: float, step: Callable[[], Awaitable[object]]) -> None:
        self._name, self._interval_s, self._step = name, interval_s, step
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._step()
            except Exception:  # one bad round must not end the work for good
                log.exception("%s: a round failed", self._name)
