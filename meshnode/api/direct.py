"""ModelInfer on the threaded server, taken off gRPC's C core by net.direct_calls.

A call is admitted (api.access) and, when it is a local hit, answered on the poller thread that took it
(serving.threaded_hits): no other thread is involved. So is a client's request that a peer's loaded copy serves,
forwarded from that thread (serving.threaded_forwards). Anything else runs the coroutine handler grpc.aio would
run, on the event loop, and is answered from there, so that no thread waits for a load or a peer. A call that
ends before its answer (the client cancelled, its deadline passed) cancels its task on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from meshnode.api.access import Access, from_member
from meshnode.api.threaded import LoopContext, ending
from meshnode.net import transport
from meshnode.net.direct_calls import DirectCall
from meshnode.serving.dataplane import INFER, TRIED_ALREADY
from meshnode.serving.threaded_forwards import ThreadedForwards
from meshnode.serving.threaded_hits import ThreadedHits
from meshpb import pb

InferHandler = Callable[[pb.ModelInferRequest, Any], Awaitable[pb.ModelInferResponse]]


def _fail(call: DirectCall, error: BaseException) -> None:
    code, details, trailing = ending(error)
    call.fail(code, details, trailing)


class DirectInfer:
    """net.direct_calls' handler of ModelInfer: `handler` is the coroutine handler (api.inference's, unguarded)."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, access: Access, hits: ThreadedHits,
                 forwards: ThreadedForwards, handler: InferHandler) -> None:
        self._loop = loop
        self._access = access
        self._hits = hits
        self._forwards = forwards
        self._handler = handler

    def __call__(self, call: DirectCall) -> None:
        refusal = self._access.admit(INFER, call)
        if refusal is not None:
            call.fail(refusal.code, refusal.message)
            return
        try:
            request = pb.ModelInferRequest.FromString(call.request)
        except DecodeError:
            call.fail(grpc.StatusCode.INTERNAL, "Exception deserializing request!")  # grpcio's words
            return
        try:
            data = self._hits.answer(request, call.invocation_metadata, from_member(), len(call.request),
                                     call.time_remaining)
            answer = self._forwards.forward(request, call.request, call.invocation_metadata,
                                            call.time_remaining) if data is None else data
        except Exception as error:
            _fail(call, error)
            return
        if isinstance(answer, bytes):
            call.reply(answer)
            return
        # The task copies this thread's context: what access recorded, the request's size for the metrics, the
        # peers a forward from here tried (this thread's next call sets each again).
        transport.REQUEST_BYTES.set(len(call.request))
        TRIED_ALREADY.set(answer.tried)
        # Watched before the task exists, so that its answer knows the call's end is awaited already.
        task: list[concurrent.futures.Future[None]] = []
        call.on_cancel(lambda: task[0].cancel() if task else None)
        task.append(asyncio.run_coroutine_threadsafe(self._on_loop(request, call), self._loop))

    async def _on_loop(self, request: pb.ModelInferRequest, call: DirectCall) -> None:
        self._hits.drain()  # what the request reads (statistics, recency, metrics) counts every hit so far
        try:
            response = await self._handler(request, LoopContext(call, call.time_remaining))
        except asyncio.CancelledError:
            raise  # the call ended: no one to answer
        except Exception as error:
            _fail(call, error)
            return
        data = response.SerializeToString()
        call.reply(data)
        report = transport.RESPONSE_BYTES_TO.get()
        if report is not None:
            report(len(data))
