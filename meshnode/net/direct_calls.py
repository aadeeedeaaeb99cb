"""One unary method of grpcio's threaded server taken straight off gRPC's C core, without grpcio's server loop.

grpcio's threaded server hands each call from its one polling thread to a worker through a futures pool and
condition variables: for a 1 MB model that hand-off cost about a third of a call's CPU (bench.hot_path). Here the
method is registered on the server's C core with a completion queue of its own, and every poller thread takes a
call's events from that queue and acts on them itself: it reads the request, calls `handle` and, when the handler
answers at once, starts the batch that writes the answer, with no other thread involved. A handler may also answer
later from any thread (the event loop, for a call it cannot answer there), and learns when the client went away.

This reaches into grpcio's private C-core binding (`grpc._cython.cygrpc`, and the server's `_cy_server`): pinned
grpcio versions only (pyproject.toml); tests/unit/meshnode/net/test_direct_calls.py fails first if that changes.
Every other method of the server stays on grpcio's own loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # no stubs: private, compiled

log = logging.getLogger(__name__)
_NO_FLAGS = 0
_CODES = {code: code.value[0] for code in grpc.StatusCode}
_NO_DEADLINE_S = 1e9  # the core's "no deadline" is centuries away
MIN_POLLERS = 4  # polling at all times; more are started while these are busy, up to the bound
POLL_S = 0.25  # how soon a poller sees the stop


class _Requested:
    """The tag of a pending request for the next call."""

    __slots__ = ()


class DirectCall:
    """One call: its request's bytes, what access and deadlines read, and its one answer (`reply` or `fail`)."""

    __slots__ = ("_call", "_calls", "_metadata", "_deadline", "request", "_answered", "_on_cancel", "_watching")

    def __init__(self, call: Any, calls: DirectCalls, metadata: tuple[tuple[str, Any], ...], deadline: float) -> None:
        self._call = call
        self._calls = calls
        self._metadata = metadata
        self._deadline = deadline
        self.request = b""
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
        deadline passed, the server stopped. For an answer that comes later from elsewhere."""
        self._on_cancel = callback
        self._watching = True
        self._calls.start_batch(self._call, (cygrpc.ReceiveCloseOnServerOperation(_NO_FLAGS),), _Closed(self))

    def reply(self, data: bytes) -> None:
        self._finish((cygrpc.SendMessageOperation(data, _NO_FLAGS),), _CODES[grpc.StatusCode.OK], b"", ())

    def fail(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        self._finish((), _CODES[code], details.encode(errors="replace"), trailing)

    def _finish(self, message: tuple[Any, ...], code: int, details: bytes,
                trailing: tuple[tuple[str, str], ...]) -> None:
        if self._answered:
            return
        self._answered = True
        operations = (cygrpc.SendInitialMetadataOperation((), _NO_FLAGS), *message,
                      cygrpc.SendStatusFromServerOperation(trailing, code, details, _NO_FLAGS))
        if not self._watching:  # the core wants the call's end received once, to release it
            operations += (cygrpc.ReceiveCloseOnServerOperation(_NO_FLAGS),)
        self._calls.start_batch(self._call, operations, None)

    def closed(self, cancelled: bool) -> None:
        """The call ended (the batch of `on_cancel` completed): `cancelled` unless it ended with its answer."""
        if cancelled and not self._answered and self._on_cancel is not None:
            self._on_cancel()


class _Read:
    __slots__ = ("call",)

    def __init__(self, call: DirectCall) -> None:
        self.call = call


class _Closed:
    __slots__ = ("call",)

    def __init__(self, call: DirectCall) -> None:
        self.call = call


Handler = Callable[[DirectCall], None]


class DirectCalls:
    """`method` ("/package.Service/Method") of `server`, served by `handle` on up to `max_pollers` threads.
    Made before the server starts; `start` after it started, `stop` after it stopped."""

    def __init__(self, server: grpc.Server, method: str, handle: Handler, max_pollers: int) -> None:
        self._core = server._cy_server  # type: ignore[attr-defined]  # grpcio's private C-core server
        self._method = method
        self._handle = handle
        self._max_pollers = max(max_pollers, MIN_POLLERS)
        # Never shut down: the core aborts the process when a batch is started on a queue that was, and an answer
        # may come from the loop at any time. It goes with the last call that can start one (each holds this).
        self._queue = cygrpc.CompletionQueue()
        self._core.register_completion_queue(self._queue)
        self._core.register_method(method)
        self._open = False
        self._pollers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._busy = 0  # pollers in `handle`, changed under _lock

    def start(self) -> None:
        self._open = True
        for _ in range(MIN_POLLERS):
            self._request_call()
            self._start_poller()

    def stop(self, timeout_s: float = 5.0) -> None:
        """After the server stopped (its calls ended): the pollers end within a poll."""
        self._open = False
        for poller in list(self._pollers):
            poller.join(timeout_s)

    def start_batch(self, call: Any, operations: tuple[Any, ...], tag: object) -> None:
        call.start_server_batch(operations, tag)

    def _request_call(self) -> None:
        self._core.request_registered_call(self._queue, self._queue, self._method, _Requested())

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
        if isinstance(tag, _Requested):
            if not event.success:
                return  # the server is stopping
            if self._open:
                self._request_call()  # the next call, while this one is served
            details = event.call_details
            call = DirectCall(event.call, self, event.invocation_metadata, details.deadline)
            self.start_batch(event.call, (cygrpc.ReceiveMessageOperation(_NO_FLAGS),), _Read(call))
        elif isinstance(tag, _Read):
            call = tag.call
            message = event.batch_operations[0].message() if event.success else None
            if message is None:
                call.fail(grpc.StatusCode.UNIMPLEMENTED, f'"{self._method}" requires exactly one request message.')
                return
            call.request = message
            with self._lock:
                self._busy += 1
                if self._busy >= len(self._pollers) and len(self._pollers) < self._max_pollers and self._open:
                    self._start_poller()  # every poller may be busy with a call a while: one more waits
            try:
                self._handle(call)
            except Exception:  # a handler answers its own errors; anything else must not end the poller
                log.exception("unexpected error serving %s", self._method)
                call.fail(grpc.StatusCode.INTERNAL, "unexpected error on the server")
            finally:
                with self._lock:
                    self._busy -= 1
        elif isinstance(tag, _Closed):
            tag.call.closed(event.batch_operations[0].cancelled())
