"""What the ThreadedHits tests share: a model that answers on the calling thread, the kit of real parts
(NodeParts' cache, replica and registry, a DataPlane, ThreadedHits) with worker threads to call from, and waits
on what those threads change."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from meshnode.runtimes.base import CallerMetadata, TensorSpec
from meshnode.serving.dataplane import DataPlane
from meshnode.serving.entries import CachedModel
from meshnode.serving.statistics import ModelStatistics
from meshnode.serving.threaded_hits import ThreadedHits
from meshpb import pb
from tests.unit.meshnode.fakes import INPUTS, OUTPUTS, SIZE, WAIT_S, NodeParts

RUNS, QUEUED, MAX_INFLIGHT = 2, 3, 64
TimeLeft = Callable[[], float | None]


# Notified whenever a worker thread changes what the tests wait for: the in-flight counts (under the cache's
# lock) and a model's runs (under its own).
CHANGED = threading.Condition()


class NotifyingLock:
    """A lock whose every release tells CHANGED's waiters to look again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        with CHANGED:
            CHANGED.notify_all()


async def until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:  # noqa: ASYNC109
    """Wait (off the loop) until `predicate()` holds, looking again at each change a worker thread makes."""
    def wait() -> bool:
        with CHANGED:
            return CHANGED.wait_for(predicate, timeout)

    assert await asyncio.to_thread(wait), "the condition did not come within the wait"


def no_deadline() -> float | None:
    return None


@dataclass(eq=False)
class CallerModel:
    """A loaded model that answers on the calling thread (runtimes.base.AnswersOnCaller); `gate` holds its runs."""

    name: str
    version: str
    size_bytes: int = SIZE
    platform: str = "onnxruntime_onnx"
    inputs: tuple[TensorSpec, ...] = INPUTS
    outputs: tuple[TensorSpec, ...] = OUTPUTS
    on_caller: bool = True
    gate: threading.Event | None = None
    errors: list[BaseException] = field(default_factory=list)  # raised by the next runs, in order
    threads: list[str] = field(default_factory=list)  # the thread of every run
    running: int = 0
    most_running: int = 0
    _lock: NotifyingLock = field(default_factory=NotifyingLock)

    def infer_now(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        with self._lock:
            self.threads.append(threading.current_thread().name)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            if self.gate is not None:
                assert self.gate.wait(WAIT_S), "the test never opened the gate"
            with self._lock:
                error = self.errors.pop(0) if self.errors else None
            if error is not None:
                raise error
            return pb.ModelInferResponse(model_name=self.name, model_version=self.version, id=request.id)
        finally:
            with self._lock:
                self.running -= 1

    async def infer(self, request: pb.ModelInferRequest, timeout_s: float | None = None,
                    caller_metadata: CallerMetadata | None = None) -> pb.ModelInferResponse:
        return self.infer_now(request)


@dataclass
class Kit:
    node: NodeParts
    dataplane: DataPlane
    statistics: ModelStatistics
    hits: ThreadedHits
    workers: ThreadPoolExecutor  # the server's worker threads

    def call(self, request: pb.ModelInferRequest, metadata: Iterable[tuple[str, str]] = (), member: bool = False,
             time_remaining: TimeLeft = no_deadline, request_bytes: int = 10) -> asyncio.Future[bytes | None]:
        """`answer` on a worker thread, as the threaded server calls it."""
        entries = tuple(metadata)
        return asyncio.get_running_loop().run_in_executor(self.workers, functools.partial(
            self.hits.answer, request, lambda: entries, member, request_bytes, time_remaining))

    def entry(self, name: str = "m") -> CachedModel:
        return self.node.cache.ready[(name, "")]


async def no_metadata(name: str, version: str) -> pb.ModelMetadataResponse | None:
    return None


async def loaded(kit: Kit, name: str = "m", model: CallerModel | None = None, **fields: Any) -> CallerModel:
    """A copy of `name` here (one request served by the loop path in its load) whose model answers on the caller."""
    await kit.node.register(name, **fields)
    await kit.node.use(name)
    model = model or CallerModel(name, "1")
    kit.entry(name).model = model
    return model




def counted(kit: Kit) -> tuple[int, int, int, int]:
    metrics = kit.node.metrics
    return metrics.api_requests, metrics.cache_hits, metrics.invoke_count, metrics.invoke_failures


def inflight(kit: Kit, name: str = "m") -> tuple[int, int]:
    return kit.entry(name).inflight, kit.dataplane.inflight


def samples(kit: Kit, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The rendered metric's samples called `name`, by their labels."""
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(kit.node.metrics.render().decode())
            for s in family.samples if s.name == name}


def hit(model_name: str = "m", id: str = "r") -> pb.ModelInferRequest:  # noqa: A002
    return pb.ModelInferRequest(model_name=model_name, id=id)
