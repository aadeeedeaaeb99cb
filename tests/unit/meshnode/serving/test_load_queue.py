import asyncio

import pytest

from meshnode.serving.load_queue import LoadQueue, priority


async def test_runs_at_most_concurrency_jobs_and_waiting_requests_go_first() -> None:
    queue = LoadQueue(concurrency=1)
    started: list[str] = []
    gate = asyncio.Event()

    async def job(name: str) -> str:
        started.append(name)
        if name == "first":
            await gate.wait()
        return name

    first = asyncio.create_task(queue.run(priority(True, 0), lambda: job("first")))
    await asyncio.sleep(0)
    old_bg = asyncio.create_task(queue.run(priority(False, 10.0), lambda: job("old-background")))
    new_bg = asyncio.create_task(queue.run(priority(False, 20.0), lambda: job("new-background")))
    request = asyncio.create_task(queue.run(priority(True, 0), lambda: job("request")))
    await asyncio.sleep(0.01)
    assert started == ["first"] and queue.running == 1 and queue.queued == 3
    gate.set()
    await asyncio.gather(first, old_bg, new_bg, request)
    assert started == ["first", "request", "new-background", "old-background"]
    assert queue.running == 0 and queue.queued == 0


async def test_a_cancelled_waiter_does_not_leak_a_slot() -> None:
    queue = LoadQueue(concurrency=1)
    gate = asyncio.Event()

    async def hold() -> None:
        await gate.wait()

    holder = asyncio.create_task(queue.run(priority(True, 0), hold))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(queue.run(priority(True, 0), hold))
    await asyncio.sleep(0)
    waiter.cancel()
    gate.set()
    await holder
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert queue.running == 0
    assert await queue.run(priority(True, 0), lambda: asyncio.sleep(0, result="ok")) == "ok"
