"""A bidirectional stream method of grpcio's threaded server taken off gRPC's C core (net.direct_calls' pollers).

grpcio's own server reads a stream's requests on a thread of the handler's and makes its worker wait for every
response's write (its sync server waits for each send to complete): a decoupled model's many responses cost a
wake-up each. Here a stream's batches complete on the pollers of net.direct_calls, which start the next one
themselves: a read's completion hands the request to the handler, a send's starts the next queued send, and the
handler learns only when a full backlog has room again (its back-pressure, without a wake per message).

Also `CoreCall`, what every call taken off the core offers (metadata, peer, deadline, the watch for its early end):
DirectCall's base as well. Same private binding as net.direct_calls (pinned grpcio versions only).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # no stubs: private, compiled

NO_FLAGS = 0
CODES = {code: code.value[0] for code in grpc.StatusCode}
_NO_DEADLINE_S = 1e9  # the core's "no deadline" is centuries away


class Completed:
    """The tag of a call's batch: `done(event)` runs on the poller that sees it complete."""

    __slots__ = ("call", "done")

    def __init__(self, call: CoreCall, done: Callable[[Any], None]) -> None:
        self.call = call
        self.done = done


class CoreCall:
    """A call taken off the core: what access, deadlines and its handler read, and the watch for its early end.
    `_end` starts the batch that answers it; `fail` answers with an error status."""

    __slots__ = ("_call", "_metadata", "_deadline", "_answered", "_on_cancel", "_watching")

    def __init__(self, call: Any, metadata: tuple[tuple[str, Any], ...], deadline: float) -> None:
        self._call = call
        self._metadata = metadata
        self._deadline = deadline
        self._answered = False
        self._on_cancel: Callable[[], object] | None = None
        self._watching = False  # a batch waits for the call's end (`on_cancel`)

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def peer_identities(self) -> Any:
        return cygrpc.peer_identities(self._call)

    def time_remaining(self) -> float | None:
        """Seconds to the call's deadline; None without one."""
        remaining = self._deadline - time.time()
        return None if remaining > _NO_DEADLINE_S else max(remaining, 0.0)

    def on_cancel(self, callback: Callable[[], object]) -> None:
        """Call `callback` (on a poller thread) if the call ends before it is answered: the client cancelled, its
        deadline passed, the server stopped. Once, while no other thread starts a batch of the call (before its
        handler hands it on)."""
        self._on_cancel = callback
        self._watching = True
        self._start((cygrpc.ReceiveCloseOnServerOperation(NO_FLAGS),), Completed(self, self._closed))

    def fail(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        self._end((), CODES[code], details.encode(errors="replace"), trailing)

    def _end(self, message: tuple[Any, ...], code: int, details: bytes,
             trailing: tuple[tuple[str, str], ...]) -> None:
        raise NotImplementedError

    def _status(self, code: int, details: bytes, trailing: tuple[tuple[str, str], ...]) -> tuple[Any, ...]:
        """The operations that end the call after what it sent."""
        operations: tuple[Any, ...] = (cygrpc.SendStatusFromServerOperation(trailing, code, details, NO_FLAGS),)
        if not self._watching:  # the core wants the call's end received once, to release it
            operations += (cygrpc.ReceiveCloseOnServerOperation(NO_FLAGS),)
        return operations

    def _start(self, operations: tuple[Any, ...], tag: Completed | None) -> None:
        self._call.start_server_batch(operations, tag)

    def _closed(self, event: Any) -> None:
        if event.batch_operations[0].cancelled() and not self._answered and self._on_cancel is not None:
            self._on_cancel()


class StreamHandler(Protocol):
    """What a stream's handler hears, on a poller thread."""

    def on_request(self, data: bytes | None) -> None:
        """The next request's bytes (after `read`); None: the client sent its last."""

    def on_room(self) -> None:
        """The backlog of responses fell below the window after it had reached it."""


class DirectStream(CoreCall):
    """One stream call. Thread-safe: its methods may be called from any thread. `serve` first, then `read` for
    each request wanted, `send` each response, and `finish` (or `fail`) once."""

    __slots__ = ("_lock", "_handler", "_window", "_reading", "_queued", "_sending", "_began", "_full", "_ending",
                 "_gone")

    def __init__(self, call: Any, metadata: tuple[tuple[str, Any], ...], deadline: float) -> None:
        super().__init__(call, metadata, deadline)
        self._lock = threading.Lock()  # the core wants a call's batches started one at a time
        self._handler: StreamHandler | None = None
        self._window = 1
        self._reading = False  # a read in flight (one at most)
        self._queued: collections.deque[bytes] = collections.deque()  # sends waiting for the one in flight
        self._sending = False  # a send in flight (one at most: a rule of the core)
        self._began = False  # the initial metadata was sent
        self._full = False  # the backlog reached the window since the handler last heard of room
        self._ending: tuple[Any, ...] | None = None  # the status, started once the sends before it are done
        self._gone = False  # a send failed: the call ended, nothing more goes out

    def serve(self, handler: StreamHandler, window: int) -> None:
        """Who hears of the requests and of room; `window`: the backlog past which `send` reports it is full."""
        self._handler = handler
        self._window = window

    def read(self) -> None:
        """Read the next request, unless a read is in flight: `on_request` hears of it."""
        with self._lock:
            if self._reading:
                return
            self._reading = True
            self._start((cygrpc.ReceiveMessageOperation(NO_FLAGS),), Completed(self, self._received))

    def send(self, data: bytes) -> int:
        """Queue a response, written after those before it; the backlog (queued and in flight) it makes. A
        stream that was answered or ended drops it."""
        with self._lock:
            if not (self._answered or self._gone):
                self._queued.append(data)
                if not self._sending:
                    self._send_next()
            backlog = len(self._queued) + self._sending
            if backlog >= self._window:
                self._full = True
            return backlog

    def backlog(self) -> int:
        """Responses queued and in flight."""
        with self._lock:
            return len(self._queued) + self._sending

    def finish(self, code: grpc.StatusCode = grpc.StatusCode.OK, details: str = "",
               trailing: tuple[tuple[str, str], ...] = ()) -> None:
        """End the stream with this status after every response sent so far; once (later ones are dropped)."""
        self._end((), CODES[code], details.encode(errors="replace"), trailing)

    def _end(self, message: tuple[Any, ...], code: int, details: bytes,
             trailing: tuple[tuple[str, str], ...]) -> None:
        with self._lock:
            if self._answered:
                return
            self._answered = True
            operations = self._status(code, details, trailing)
            if not self._began:
                operations = (cygrpc.SendInitialMetadataOperation((), NO_FLAGS), *operations)
                self._began = True
            if self._sending:  # the queue is empty unless a send is in flight
                self._ending = operations
            else:
                self._start(operations, None)

    def _send_next(self) -> None:
        """Under the lock, with a send queued and none in flight."""
        operations: tuple[Any, ...] = (cygrpc.SendMessageOperation(self._queued.popleft(), NO_FLAGS),)
        if not self._began:
            operations = (cygrpc.SendInitialMetadataOperation((), NO_FLAGS), *operations)
            self._began = True
        self._sending = True
        self._start(operations, Completed(self, self._sent))

    def _sent(self, event: Any) -> None:
        with self._lock:
            self._sending = False
            if not event.success:  # the call ended: nothing more goes out (on_cancel tells the handler)
                self._gone = True
                self._queued.clear()
                self._ending = None
            elif self._queued:
                self._send_next()
            elif self._ending is not None:
                self._start(self._ending, None)
                self._ending = None
            room = self._full and len(self._queued) + self._sending < self._window
            if room:
                self._full = False
        if room and self._handler is not None:
            self._handler.on_room()

    def _received(self, event: Any) -> None:
        with self._lock:
            self._reading = False
        if event.success and self._handler is not None:  # else the call ended: on_cancel tells the handler
            self._handler.on_request(event.batch_operations[0].message())
