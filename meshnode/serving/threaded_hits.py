"""Local hits answered on the threaded server's polling threads, without a trip through the event loop.

A ModelInfer taken off gRPC's C core by a polling thread (net.direct_calls, api.direct) costs far less CPU than
grpc.aio's task per call (bench.hot_path), and ONNX Runtime releases the GIL while it runs: a hit on a copy here
that answers on the calling thread (runtimes.base.AnswersOnCaller) runs on the thread that took the call. Only what
a hit must decide is done there: the copy's lookup, the in-flight counts (the one state both sides change, under the
cache's lock), the run and the response's bytes. Its bookkeeping (the cache's recency, statistics, metrics) is
queued and applied on the loop in batches (`drain`), so every part the loop owns is still changed by the loop alone,
and is current whenever the loop reads it for a call.

Anything else is not a hit here: `answer` returns None and the caller sends the request down the loop path
(serving.dataplane), which decides it exactly as before: a miss, a sequence, a copy at its bound, a model with
a registered timeout (which only the loop can abandon), a forged hop, a copy unloaded under the request.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from meshnode.errors import DeadlineExceeded, ModelUnavailable
from meshnode.observability.metrics import NodeMetrics
from meshnode.observability.tracing import Tracing, status_code
from meshnode.runtimes.base import AnswersOnCaller, CallerMetadata, TensorSpec
from meshnode.serving.cache import ModelCache
from meshnode.serving.dataplane import INFER, DataPlane, TimeRemaining
from meshnode.serving.entries import CachedModel
from meshnode.serving.replica import INVOKE, RUN_TIME_WEIGHT
from meshnode.serving.statistics import ModelStatistics
from meshnode.state.registry import ModelRecord
from meshpb import pb
from router.errors import MeshError
from router.hop import HOP_METADATA, PARAMETER_KEY, Hop
from router.sequences import sequence_of

# Each wake of the loop costs the polling threads the GIL, and cost a hit about 10% more CPU when it came every
# 10 ms: hits that end within this many seconds share one. Whatever reads what hits change drains first
# (api.threaded and api.direct before every call they run on the loop, a metrics scrape, REST), so only
# background parts (placement's view of recency and load) see it up to this late.
DRAIN_EVERY_S = 0.2


@dataclass(slots=True)
class _Ran:
    """One hit, for the loop's bookkeeping."""

    entry: CachedModel
    inputs: tuple[TensorSpec, ...]
    request: pb.ModelInferRequest
    left: int  # requests still in flight on the copy after this one
    started: float  # perf_counter: arrived, called the runtime, answered
    began: float
    ended: float
    code: str  # its gRPC status name
    request_bytes: int
    response_bytes: int | None


@dataclass(frozen=True, slots=True)
class Forwarded:
    """One request forwarded to a peer from a polling thread (serving.threaded_forwards), for the loop's metrics."""

    model: str
    started: float  # perf_counter
    ended: float
    code: str  # its gRPC status name
    request_bytes: int
    response_bytes: int | None


def _wait_s(remaining: float | None) -> float:
    return -1 if remaining is None else remaining  # Lock.acquire's "no timeout" is -1


class ThreadedHits:
    def __init__(self, *, cache: ModelCache, dataplane: DataPlane, alias_targets: Mapping[str, str],
                 records: Mapping[str, ModelRecord], metrics: NodeMetrics, statistics: ModelStatistics,
                 instance_id: str, loop: asyncio.AbstractEventLoop, tracing: Tracing | None = None) -> None:
        self._ready = cache.ready
        self._cache = cache
        self._lock = cache.inflight_lock
        self._dataplane = dataplane
        self._alias_targets = alias_targets
        self._records = records
        self._metrics = metrics
        self._statistics = statistics
        self._instance_id = instance_id
        self._loop = loop
        self._tracing = tracing
        self._runs_per_copy = cache.queues.runs_per_copy
        self._max_per_copy = cache.queues.runs_per_copy + cache.queues.max_queued
        self._answers: dict[type, bool] = {}
        self._ran: deque[_Ran | Forwarded] = deque()
        self._drain_due = False

    def answer(self, request: pb.ModelInferRequest, metadata: CallerMetadata, member: bool, request_bytes: int,
               time_remaining: TimeRemaining) -> bytes | None:
        """The response's bytes, when a copy here answered on this thread; None: not a hit here. A request
        the copy refuses (bad input, a failed run) raises its MeshError, as the loop path would."""
        entry = self._hit(request, metadata, member)
        if entry is None or (model := entry.model) is None:
            return None
        answers = self._answers.get(type(model))
        if answers is None:  # a runtime_checkable isinstance costs microseconds: once per model class
            answers = self._answers[type(model)] = isinstance(model, AnswersOnCaller)
        if not answers or not cast(AnswersOnCaller, model).on_caller:
            return None
        inputs = model.inputs  # the entry may lose its model before the loop's bookkeeping reads them
        plane, turn = self._dataplane, None
        with self._lock:
            inflight = entry.inflight
            # At a bound, or queued to miss its deadline: the loop path refuses it, or sends it to another copy.
            if (entry.discarded or inflight >= self._max_per_copy or plane.inflight >= plane.max_inflight
                    or (inflight >= self._runs_per_copy
                        and plane.past_deadline(entry, inflight, time_remaining) is not None)):
                return None
            entry.inflight += 1
            plane.inflight += 1
            if entry.running < self._runs_per_copy:
                entry.running += 1
            else:  # wait for a run slot: a request that ends hands it over by releasing this lock
                turn = threading.Lock()
                turn.acquire()
                entry.turns.append(turn)
        started = time.perf_counter()
        began, code, data, slot = started, "OK", None, turn is None
        try:
            if turn is not None:
                slot = turn.acquire(timeout=_wait_s(time_remaining()))
                began = time.perf_counter()
                if not slot:
                    raise DeadlineExceeded(f"model '{entry.name}' had no free run slot on node "
                                           f"{self._instance_id} before the request's deadline")
            data = self._run(cast(AnswersOnCaller, model), request, metadata)
            return data
        except ModelUnavailable:
            code = ""  # unloaded under the request: the loop path serves it (the copy is gone from `ready`)
            return None
        except BaseException as error:
            code = status_code(error).name
            if isinstance(error, MeshError) and error.node is None:
                error.node = self._instance_id
            raise
        finally:
            with self._lock:
                if turn is not None and not slot and turn in entry.turns:
                    entry.turns.remove(turn)  # gave up waiting
                elif entry.turns:
                    entry.turns.popleft().release()  # the slot, this one's or just handed to it, goes on
                else:
                    entry.running -= 1
                entry.inflight -= 1
                plane.inflight -= 1
                left = entry.inflight
            self.done(_Ran(entry, inputs, request, left, started, began, time.perf_counter(), code, request_bytes,
                           len(data) if data is not None else None))

    def done(self, ran: _Ran | Forwarded) -> None:
        """From a polling thread: a request it answered, for the loop's bookkeeping."""
        self._ran.append(ran)
        if not self._drain_due:  # one wake of the loop per DRAIN_EVERY_S at most
            self._drain_due = True
            self._loop.call_soon_threadsafe(self._loop.call_later, DRAIN_EVERY_S, self.drain)

    def _hit(self, request: pb.ModelInferRequest, metadata: CallerMetadata, member: bool) -> CachedModel | None:
        entry = self._ready.get((request.model_name, request.model_version))
        if entry is None:
            target = self._alias_targets.get(request.model_name)
            if target is None or (entry := self._ready.get((target, request.model_version))) is None:
                return None
            request.model_name = target  # the request, and so the response, names the model served
        record = self._records.get(entry.name)
        if record is None or record.timeout_ms is not None:
            return None
        if request.parameters and (sequence_of(request.parameters) is not None
                                   or (not member and PARAMETER_KEY in request.parameters)):
            return None
        if not member and any(key in HOP_METADATA for key, _ in metadata() or ()):
            return None  # the loop path strips and counts it
        return entry

    def _run(self, model: AnswersOnCaller, request: pb.ModelInferRequest, metadata: CallerMetadata) -> bytes:
        if self._tracing is None:
            return model.infer_now(request).SerializeToString()
        with self._tracing.server(INFER, metadata()) as span:
            if span.is_recording():
                sent = request.parameters.get(PARAMETER_KEY)
                self._tracing.describe(span, INFER, request.model_name, request.model_version,
                                       Hop.decode(sent.string_param) if sent is not None else Hop())
            return model.infer_now(request).SerializeToString()

    def drain(self) -> None:
        """On the loop: the bookkeeping of every hit that ended since the last drain. Run before the loop
        reads what hits change (api.threaded before every call it runs there, a metrics scrape), and at most
        DRAIN_EVERY_S after a hit anyway."""
        self._drain_due = False
        metrics, cache, statistics = self._metrics, self._cache, self._statistics
        while self._ran:
            ran = self._ran.popleft()
            if isinstance(ran, Forwarded):
                metrics.api_requests += 1
                metrics.observe_api(INFER, ran.code, (ran.ended - ran.started) * 1000.0, ran.model, ran.request_bytes,
                                    ran.response_bytes)
                continue
            entry = ran.entry
            cache.finished(entry, ran.left, served=bool(ran.code))
            if not ran.code:
                continue
            ms = (ran.ended - ran.started) * 1000.0
            metrics.api_requests += 1
            metrics.cache_hits += 1
            metrics.invoke_count += 1
            if ran.began > ran.started:
                metrics.observe_queue_delay_ms((ran.began - ran.started) * 1000.0)
            else:
                metrics.ran_without_waiting += 1
            if ran.code != "OK":
                metrics.invoke_failures += 1
            elif ran.began == ran.started:  # its time says how long a run takes, not a queue's wait
                took = ran.ended - ran.began
                entry.run_s += RUN_TIME_WEIGHT * (took - entry.run_s) if entry.run_s else took
            statistics.finished(entry.name, entry.version, ran.inputs, ran.request, ran.started, ran.began, ran.ended,
                                ran.code == "OK")
            metrics.observe_invoke(INVOKE, ran.code, ms, entry.name)
            metrics.observe_api(INFER, ran.code, ms, ran.request.model_name, ran.request_bytes, ran.response_bytes)
