"""The node's gRPC services on grpcio's threaded server (net.transport.create_threaded_server).

Every call is admitted on the worker thread that received it (api.access), then runs the coroutine handler
grpc.aio would run, on the node's event loop, while the worker waits: a unary call as one task, a stream's
requests fed to its async generator by a reader thread, its responses made by one task on the loop that runs a
window ahead of the worker writing them (the stream's back-pressure). A call the client cancels, or whose deadline passes, cancels its task on the loop. ModelInfer is
not among them: it is served off the C core directly (api.direct).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import inspect
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator, Mapping
from typing import Any, NoReturn, TypeVar

import grpc

from meshnode.api.access import Access, CallContext
from meshnode.api.status import status_of, trailing_of
from meshnode.net import transport
from meshnode.serving.threaded_hits import ThreadedHits

T = TypeVar("T")
INFER = "ModelInfer"
# Requests of one stream read ahead of its handler: past this, the reader waits and gRPC's flow control
# holds the client.
STREAM_WINDOW = 16
_POLL_S = 0.5  # how often a waiting stream reader looks whether its call is still alive
_NO_DEADLINE_S = 1e9  # 31 years: past any deadline a client sets


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...]) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, trailing


def time_remaining(context: grpc.ServicerContext) -> float | None:
    """The call's time left, None without a deadline (the threaded server's "none" is about 2**63 s)."""
    remaining = context.time_remaining()
    return None if remaining > _NO_DEADLINE_S else remaining


class LoopContext:
    """What the coroutine handlers read of a call, as grpc.aio's context, from another server's (`remaining`:
    the call's time left, None without a deadline)."""

    def __init__(self, context: CallContext, remaining: Callable[[], float | None]) -> None:
        self._context = context
        self._remaining = remaining

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def peer_identities(self) -> Any:
        return self._context.peer_identities()

    def time_remaining(self) -> float | None:
        return self._remaining()

    async def abort(self, code: grpc.StatusCode, details: str,
                    trailing_metadata: tuple[tuple[str, str], ...] = ()) -> NoReturn:
        raise _Aborted(code, details, trailing_metadata)


def ending(error: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status, message and trailing metadata a handler's error ends its call with (api.status: one map)."""
    if isinstance(error, _Aborted):
        return error.code, error.details, error.trailing
    if isinstance(error, concurrent.futures.CancelledError):
        return grpc.StatusCode.CANCELLED, "the call was cancelled", ()
    (code, details), trailing = status_of(error), trailing_of(error)
    return code, details, trailing


def _end(context: grpc.ServicerContext, error: BaseException) -> NoReturn:
    code, details, trailing = ending(error)
    if trailing:
        context.set_trailing_metadata(trailing)
    context.abort(code, details)


class ThreadedServices:
    def __init__(self, *, loop: asyncio.AbstractEventLoop, access: Access, hits: ThreadedHits | None = None) -> None:
        self._loop = loop
        self._access = access
        self._hits = hits  # None: no local hits to count before a call (api.direct answers them)

    def handlers(self, handlers: Mapping[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
        """The threaded server's handlers for grpc.aio-style ones (not guarded: admission is done here), but
        ModelInfer's (api.direct)."""
        return {method: self._stream(method, handler) if inspect.isasyncgenfunction(handler)
                else self._unary(method, handler) for method, handler in handlers.items() if method != INFER}

    def _admit(self, method: str, context: grpc.ServicerContext) -> None:
        refusal = self._access.admit(method, context)
        if refusal is not None:
            context.abort(refusal.code, refusal.message)

    def _on_loop(self, call: Coroutine[Any, Any, T], context: grpc.ServicerContext, running: _Running) -> T:
        future = running.start(asyncio.run_coroutine_threadsafe(self._after_hits(call), self._loop))
        try:
            return future.result()
        except BaseException as error:
            _end(context, error)

    async def _after_hits(self, call: Coroutine[Any, Any, T]) -> T:
        if self._hits is not None:  # what the call reads (statistics, recency, metrics) counts every hit so far
            self._hits.drain()
        return await call


    def _unary(self, method: str, handler: Callable[..., Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
        async def sized(request: Any, context: LoopContext) -> tuple[Any, Callable[[int], None] | None]:
            # The handler's context on the loop learns what records the response's size; the worker writes it.
            return await handler(request, context), transport.RESPONSE_BYTES_TO.get()

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            self._admit(method, context)
            response, report = self._on_loop(sized(request, LoopContext(context, functools.partial(
                time_remaining, context))), context, _Running(context))
            transport.RESPONSE_BYTES_TO.set(report)
            return response

        return unary

    def _stream(self, method: str, handler: Callable[..., AsyncGenerator[Any, None]],
                ) -> Callable[[Iterator[Any], grpc.ServicerContext], Iterator[Any]]:
        loop = self._loop

        def stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            self._admit(method, context)
            feed = _Feed(loop)
            threading.Thread(target=feed.pump, args=(requests, context), name="grpc-stream-reader",
                             daemon=True).start()
            responses = handler(feed, LoopContext(context, functools.partial(time_remaining, context)))
            outbox = _Outbox(loop)
            context.add_callback(outbox.end)  # the call ended first: the worker stops waiting
            _Running(context).start(asyncio.run_coroutine_threadsafe(self._after_hits(outbox.fill(responses)), loop))
            while (item := outbox.take()) is not _END:
                if isinstance(item, _Failed):
                    _end(context, item.error)
                yield item

        return stream


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Outbox:
    """A stream's responses, made on the loop by one task that runs ahead of the worker writing them by up to
    STREAM_WINDOW (a decoupled model's many responses wake neither side once per response: the task waits only
    when the window is full, the worker only when it is empty)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[Any] = collections.deque()
        self._ready = threading.Condition()
        self._room = asyncio.Event()

    async def fill(self, responses: AsyncGenerator[Any, None]) -> None:
        """On the loop: every response, then the end or the handler's error."""
        last: Any = _END
        try:
            async for response in responses:
                while len(self._items) >= STREAM_WINDOW:
                    self._room.clear()
                    if len(self._items) >= STREAM_WINDOW:  # the worker may have taken one meanwhile
                        await self._room.wait()
                self._put(response)
        except asyncio.CancelledError:
            raise  # the call ended: no one to answer
        except BaseException as error:
            last = _Failed(error)
        finally:
            await responses.aclose()
            self._put(last)

    def _put(self, item: Any) -> None:
        with self._ready:
            self._items.append(item)
            self._ready.notify()

    def end(self) -> None:
        self._put(_END)

    def take(self) -> Any:
        """On the worker: the next response, or _END, or a _Failed."""
        with self._ready:
            while not self._items:
                self._ready.wait()
            item = self._items.popleft()
            if len(self._items) == STREAM_WINDOW - 1:  # the loop's task may be waiting for room
                self._loop.call_soon_threadsafe(self._room.set)
            return item


class _Running:
    """A call's work on the loop now: cancelled when the call ends first (the client cancelled, the deadline
    passed), so that its task stops; work set after the call ended is cancelled at once."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._future: concurrent.futures.Future[Any] | None = None
        self._ended = not context.add_callback(self._cancel)  # False: the call has ended already

    def start(self, future: concurrent.futures.Future[T]) -> concurrent.futures.Future[T]:
        self._future = future
        if self._ended:
            future.cancel()
        return future

    def _cancel(self) -> None:
        self._ended = True
        if self._future is not None:
            self._future.cancel()


_END = object()


class _Feed:
    """A stream's requests as the loop's async iterator, read from gRPC's blocking iterator by a thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._room = threading.Semaphore(STREAM_WINDOW)

    def pump(self, requests: Iterator[Any], context: grpc.ServicerContext) -> None:
        try:
            for request in requests:
                while not self._room.acquire(timeout=_POLL_S):
                    if not context.is_active():
                        return
                # Its size, known where it was parsed (on this thread), goes with it to the loop's reader.
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (request, transport.REQUEST_BYTES.get()))
        except grpc.RpcError:
            pass  # the call was cancelled: the handler's task is cancelled with it
        finally:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, _END)

    def __aiter__(self) -> _Feed:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # whoever reads again also learns the end
            raise StopAsyncIteration
        self._room.release()
        request, size = item
        transport.REQUEST_BYTES.set(size)  # as grpc.aio sets it in the task that reads the stream
        return request


def after_hits(handlers: Mapping[str, Callable[..., Any]], hits: ThreadedHits) -> dict[str, Callable[..., Any]]:
    """The handlers (REST's), whose unary ones first apply the bookkeeping of every local hit so far."""
    def drained(handler: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(handler)
        async def call(request: Any, context: Any) -> Any:
            hits.drain()
            return await handler(request, context)

        return call

    return {method: handler if inspect.isasyncgenfunction(handler) else drained(handler)
            for method, handler in handlers.items()}
