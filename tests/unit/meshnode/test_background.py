"""cancel_and_wait: the task's own cancellation is swallowed, the caller's is not; BackgroundTasks and Periodic
stop through it."""

from __future__ import annotations

import asyncio

import pytest

from meshnode.background import BackgroundTasks, Periodic, cancel_and_wait

pytestmark = pytest.mark.timeout(10)


async def forever() -> None:
    await asyncio.Event().wait()


class SlowToStop:
    """Work whose cleanup, once cancelled, waits for `release`: its stopper is left waiting meanwhile."""

    def __init__(self) -> None:
        self.started, self.stopping, self.release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def __call__(self) -> None:
        self.started.set()
        try:
            await forever()
        finally:
            self.stopping.set()
            await self.release.wait()


async def fails() -> None:
    raise RuntimeError("its own error, logged by itself")


async def test_a_stopped_task_ends_and_the_caller_goes_on() -> None:
    task = asyncio.create_task(forever())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled()


async def test_a_task_that_ended_already_is_waited_for_without_error() -> None:
    task = asyncio.create_task(asyncio.sleep(0))
    await task
    await cancel_and_wait(task)
    assert task.done() and not task.cancelled()


async def test_the_callers_own_cancellation_while_it_waits_is_not_swallowed() -> None:
    slow = SlowToStop()
    worker = asyncio.create_task(slow())
    after_stop: list[str] = []

    async def stop_then_go_on() -> None:
        await cancel_and_wait(worker)
        after_stop.append("ran on")  # what a cancelled caller must never reach

    stopper = asyncio.create_task(stop_then_go_on())
    await slow.stopping.wait()
    stopper.cancel()  # e.g. the stopper's own deadline, while the worker is still cleaning up
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert after_stop == [] and worker.cancelled()


async def test_a_task_that_swallows_cancellation_still_leaves_its_cancelled_caller_cancelled() -> None:
    stopping, release = asyncio.Event(), asyncio.Event()

    async def swallows() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopping.set()
            while not release.is_set():  # ignores every further cancel, then returns normally
                try:
                    await release.wait()
                except asyncio.CancelledError:
                    release.set()

    worker = asyncio.create_task(swallows())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(worker))
    await stopping.wait()
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert worker.done() and not worker.cancelled()


async def test_a_caller_already_being_cancelled_finishes_its_cleanup() -> None:
    first, second = asyncio.create_task(forever()), asyncio.create_task(forever())
    cleaned: list[asyncio.Task[None]] = []

    async def owner() -> None:
        try:
            await forever()
        finally:  # a stop() in a cleanup handler: both tasks go, then the owner's cancellation goes on
            for task in (first, second):
                await cancel_and_wait(task)
                cleaned.append(task)

    running = asyncio.create_task(owner())
    await asyncio.sleep(0)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert cleaned == [first, second] and first.cancelled() and second.cancelled()


async def test_background_tasks_cancel_every_task_and_are_cancellable_themselves() -> None:
    tasks = BackgroundTasks()
    spawned = [tasks.spawn(forever()) for _ in range(3)]
    failed = tasks.spawn(fails())
    await asyncio.sleep(0)
    await tasks.cancel()
    assert all(t.cancelled() for t in spawned) and isinstance(failed.exception(), RuntimeError)

    slow = SlowToStop()
    tasks.spawn(slow())
    await slow.started.wait()
    canceller = asyncio.create_task(tasks.cancel())
    await slow.stopping.wait()
    canceller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await canceller


async def test_a_periodic_stop_awaited_by_a_cancelled_task_is_cancelled_too() -> None:
    slow = SlowToStop()
    periodic = Periodic("test", 0.0, slow)
    periodic.start()
    await slow.started.wait()  # the first step is under way: once cancelled, its cleanup waits for `release`
    stopper = asyncio.create_task(periodic.stop())
    await slow.stopping.wait()
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
