"""The node's gRPC services on grpcio's threaded server (net.transport.create_threaded_server).

Every call is admitted on the worker thread that received it (api.access), then runs the coroutine handler
grpc.aio would run, as one task on the node's event loop, while the worker waits. A call the client cancels, or
whose deadline passes, cancels its task on the loop. ModelInfer and ModelStreamInfer are not among them: they are
served off the C core directly (api.direct, api.direct_stream), which share this module's context and error map.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, NoReturn, TypeVar

import grpc

from meshnode.api.access import Access, CallContext
from meshnode.api.status import status_of, trailing_of
from meshnode.net import transport
from meshnode.serving.dataplane import INFER, STREAM_INFER
from meshnode.serving.threaded_hits import ThreadedHits

T = TypeVar("T")
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
        """The threaded server's handlers for grpc.aio-style unary ones (not guarded: admission is done here), but
        ModelInfer's and ModelStreamInfer's (api.direct, api.direct_stream)."""
        return {method: self._unary(method, handler) for method, handler in handlers.items()
                if method not in (INFER, STREAM_INFER)}

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
