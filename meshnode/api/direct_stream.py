"""ModelStreamInfer on the threaded server, taken off gRPC's C core by net.direct_calls (net.direct_streams).

A stream is admitted (api.access) on the polling thread that took it, then served by the coroutine handler grpc.aio
would run (api.inference's async generator) in one task on the event loop. Its requests are read and parsed on the
pollers and handed to that task, at most STREAM_WINDOW ahead of it (past that, gRPC's flow control holds the
client); its responses are written by the pollers, at most STREAM_WINDOW behind it (past that, the task waits for
room). Neither side wakes the other once per message: the pollers start the next write themselves, and the task
waits only when its window is full. A stream that ends before its answer (the client cancelled, its deadline
passed) cancels its task.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from meshnode.api.access import Access
from meshnode.api.threaded import LoopContext, ending
from meshnode.net import transport
from meshnode.net.direct_streams import DirectStream
from meshnode.serving.dataplane import STREAM_INFER
from meshnode.serving.threaded_hits import ThreadedHits
from meshpb import pb

# Requests of one stream read ahead of its handler, and responses it makes ahead of their writes.
STREAM_WINDOW = 16
StreamInferHandler = Callable[[AsyncIterator[pb.ModelInferRequest], Any],
                              AsyncGenerator[pb.ModelStreamInferResponse, None]]
_END = object()


class _Feed:
    """One stream's requests, from the pollers to its task as an async iterator; the room for its responses; and
    its task's cancel. Its `on_*` methods run on the pollers (net.direct_streams.StreamHandler), the rest on the
    loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, call: DirectStream) -> None:
        self._loop = loop
        self._call = call
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        self._lock = threading.Lock()
        self._unread = 0  # requests handed to the loop and not yet taken by the handler, under _lock
        self.room = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.cancelled = False

    def on_request(self, data: bytes | None) -> None:
        if data is None:
            self._loop.call_soon_threadsafe(self._requests.put_nowait, _END)
            return
        try:
            request = pb.ModelInferRequest.FromString(data)
        except DecodeError:
            self._call.fail(grpc.StatusCode.INTERNAL, "Exception deserializing request!")  # grpcio's words
            self.on_cancel()
            return
        with self._lock:
            self._unread += 1
            more = self._unread < STREAM_WINDOW
        self._loop.call_soon_threadsafe(self._requests.put_nowait, (request, len(data)))
        if more:
            self._call.read()

    def on_room(self) -> None:
        self._loop.call_soon_threadsafe(self.room.set)

    def on_cancel(self) -> None:
        """The stream ended before its answer: its task stops (on the loop, where it starts, so that a cancel that
        comes first is seen)."""
        self._loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()

    def __aiter__(self) -> _Feed:
        return self

    async def __anext__(self) -> pb.ModelInferRequest:
        item = await self._requests.get()
        if item is _END:
            self._requests.put_nowait(_END)  # whoever reads again also learns the end
            raise StopAsyncIteration
        with self._lock:
            self._unread -= 1
            resume = self._unread == STREAM_WINDOW - 1  # the pollers stopped reading at the window
        if resume:
            self._call.read()
        request, size = item
        transport.REQUEST_BYTES.set(size)  # as grpc.aio sets it in the task that reads the stream
        return request  # type: ignore[no-any-return]


class DirectStreamInfer:
    """net.direct_calls' handler of new ModelStreamInfer calls: `handler` is api.inference's (unguarded)."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, access: Access, hits: ThreadedHits,
                 handler: StreamInferHandler) -> None:
        self._loop = loop
        self._access = access
        self._hits = hits
        self._handler = handler

    def __call__(self, call: DirectStream) -> None:
        refusal = self._access.admit(STREAM_INFER, call)
        if refusal is not None:
            call.fail(refusal.code, refusal.message)
            return
        feed = _Feed(self._loop, call)
        call.serve(feed, STREAM_WINDOW)
        call.on_cancel(feed.on_cancel)  # watched before the task exists, which may answer at once
        # The task copies this thread's context: what access recorded.
        asyncio.run_coroutine_threadsafe(self._on_loop(feed, call), self._loop)
        call.read()

    async def _on_loop(self, feed: _Feed, call: DirectStream) -> None:
        feed.task = asyncio.current_task()
        if feed.cancelled:
            return
        self._hits.drain()  # what the requests read (statistics, recency, metrics) counts every hit so far
        responses = self._handler(feed, LoopContext(call, call.time_remaining))
        try:
            async for response in responses:
                if call.send(response.SerializeToString()) >= STREAM_WINDOW:
                    feed.room.clear()  # the wake-up for this full window runs on the loop, after this
                    await feed.room.wait()
        except asyncio.CancelledError:
            raise  # the call ended: no one to answer
        except Exception as error:
            call.finish(*ending(error))
            return
        finally:
            await responses.aclose()
        call.finish()
