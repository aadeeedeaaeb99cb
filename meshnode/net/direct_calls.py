"""Methods of grpcio's threaded server taken straight off gRPC's C core, without grpcio's server loop.

grpcio's threaded server hands each call from its one polling thread to a worker through a futures pool and
condition variables: for a 1 MB model that hand-off cost about a third of a call's CPU (bench.hot_path). Here the
methods are registered on the server's C core with a completion queue of their own, and every poller thread takes a
call's events from that queue and acts on them itself. A unary method's call: it reads the request, calls `handle`
and, when the handler answers at once, starts the batch that writes the answer, with no other thread involved. A
handler may also answer later from any thread (the event loop, for a call it cannot answer there), and learns when
the client went away. A stream method's call (net.direct_streams) is handed to its handler when it arrives, and
each of its reads and writes completes on a poller, which starts the next write itself.

This reaches into grpcio's private C-core binding (`grpc._cython.cygrpc`, and the server's `_cy_server`): pinned
grpcio versions only (pyproject.toml); tests/unit/meshnode/net/test_direct_calls.py fails first if that changes.
Every other method of the server stays on grpcio's own loop.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import grpc
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # no stubs: private, compiled

from meshnode.net.direct_streams import CODES, NO_FLAGS, Completed, CoreCall, DirectStream

log = logging.getLogger(__name__)
C = TypeVar("C", bound=CoreCall)
MIN_POLLERS = 4  # polling at all times; more are started while these are busy, up to the bound
POLL_S = 0.25  # how soon a poller sees the stop


class _Requested:
    """The tag of a pending request for the next call of `method`."""

    __slots__ = ("method",)

    def __init__(self, method: str) -> None:
        self.method = method


class DirectCall(CoreCall):
    """One unary call: its request's bytes, what access and deadlines read, and its one answer (`reply` or
    `fail`)."""

    __slots__ = ("request",)

    def __init__(self, call: Any, metadata: tuple[tuple[str, Any], ...], deadline: float) -> None:
        super().__init__(call, metadata, deadline)
        self.request = b""

    def reply(self, data: bytes) -> None:
        self._end((cygrpc.SendMessageOperation(data, NO_FLAGS),), CODES[grpc.StatusCode.OK], b"", ())

    def _end(self, message: tuple[Any, ...], code: int, details: bytes,
             trailing: tuple[tuple[str, str], ...]) -> None:
        if self._answered:
            return
        self._answered = True
        self._start((cygrpc.SendInitialMetadataOperation((), NO_FLAGS), *message,
                     *self._status(code, details, trailing)), None)


Handler = Callable[[DirectCall], None]
StreamHandle = Callable[[DirectStream], None]  # a new stream call, on the poller that took it


class DirectCalls:
    """The unary `method` ("/package.Service/Method") of `server`, served by `handle`, and its stream methods
    (`streams`: the handler of each one's new calls), on up to `max_pollers` threads. Made before the server
    starts; `start` after it started, `stop` after it stopped."""

    def __init__(self, server: grpc.Server, method: str, handle: Handler, max_pollers: int,
                 streams: Mapping[str, StreamHandle] | None = None) -> None:
        self._core = server._cy_server  # type: ignore[attr-defined]  # grpcio's private C-core server
        self._method = method
        self._handle = handle
        self._streams = dict(streams or {})
        self._max_pollers = max(max_pollers, MIN_POLLERS)
        # Never shut down: the core aborts the process when a batch is started on a queue that was, and an answer
        # may come from the loop at any time. It goes with the last call that can start one (each holds this).
        self._queue = cygrpc.CompletionQueue()
        self._core.register_completion_queue(self._queue)
        for registered in (method, *self._streams):
            self._core.register_method(registered)
        self._open = False
        self._pollers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._busy = 0  # pollers serving a call, changed under _lock

    def start(self) -> None:
        self._open = True
        for _ in range(MIN_POLLERS):
            for method in (self._method, *self._streams):
                self._request_call(method)
            self._start_poller()

    def stop(self, timeout_s: float = 5.0) -> None:
        """After the server stopped (its calls ended): the pollers end within a poll."""
        self._open = False
        for poller in list(self._pollers):
            poller.join(timeout_s)

    def _request_call(self, method: str) -> None:
        self._core.request_registered_call(self._queue, self._queue, method, _Requested(method))

    def _start_poller(self) -> None:
        poller = threading.Thread(target=self._poll, name="grpc-direct", daemon=True)
        self._pollers.append(poller)
        poller.start()

    def _poll(self) -> None:
        timeout = cygrpc.CompletionType.queue_timeout
        while self._open:
            event = self._queue.poll(time.time() + POLL_S)
            if event.completion_type != timeout:
                self._on_event(event)

    def _on_event(self, event: Any) -> None:
        tag = event.tag
        if isinstance(tag, Completed):
            self._guarded(tag.call, tag.done, event)
        elif isinstance(tag, _Requested) and event.success:  # else the server is stopping
            if self._open:
                self._request_call(tag.method)  # the next call, while this one is served
            metadata, deadline = event.invocation_metadata, event.call_details.deadline
            if tag.method == self._method:
                call = DirectCall(event.call, metadata, deadline)
                read = Completed(call, functools.partial(self._read, call))
                call._start((cygrpc.ReceiveMessageOperation(NO_FLAGS),), read)
            else:
                stream = DirectStream(event.call, metadata, deadline)
                self._guarded(stream, functools.partial(self._busy_with, self._streams[tag.method]), stream)

    def _read(self, call: DirectCall, event: Any) -> None:
        message = event.batch_operations[0].message() if event.success else None
        if message is None:
            call.fail(grpc.StatusCode.UNIMPLEMENTED, f'"{self._method}" requires exactly one request message.')
            return
        call.request = message
        self._busy_with(self._handle, call)

    def _guarded(self, call: CoreCall, work: Callable[[Any], None], arg: Any) -> None:
        """`work(arg)` for `call`: an error its handler did not answer itself fails the call, and must not end the
        poller."""
        try:
            work(arg)
        except Exception:
            log.exception("unexpected error serving a call taken off the core")
            call.fail(grpc.StatusCode.INTERNAL, "unexpected error on the server")

    def _busy_with(self, handle: Callable[[C], None], call: C) -> None:
        """`handle(call)`: a unary call's handler, or a stream's at its start, which may keep this poller a while
        (one more polls when every one is busy). A stream's reads and writes, done at once, are not counted: that
        bookkeeping cost more poller CPU per streamed response than the rest of its handling."""
        with self._lock:
            self._busy += 1
            if self._busy >= len(self._pollers) and len(self._pollers) < self._max_pollers and self._open:
                self._start_poller()  # every poller may be busy with a call a while: one more waits
        try:
            handle(call)
        finally:
            with self._lock:
                self._busy -= 1
