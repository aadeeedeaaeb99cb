"""What this node's runtime executed, per model and version, as Triton's ModelStatistics reports it.

Only the node that ran a request counts it (the local replica, when a run finishes), so the nodes' reports
add up to the mesh's without counting a forwarded request twice: `merge` sums them.

A run's `queue` is its time from entering the node's dataplane to the runtime's call (waiting for a run
slot or for the copy's load), `compute_infer` the runtime's call. ONNX Runtime decodes and encodes tensors
inside that call and Triton beside the node does it in its own process, so `compute_input` and
`compute_output` count every execution with no time of their own. A request counts as many inferences as
its batch holds when the model batches (the first dimension of every input is dynamic, as ModelConfig's
`max_batch_size` says), else as one. Plain ints touched from the event loop only, as NodeMetrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tritonclient.grpc import service_pb2 as triton_pb

from meshnode.runtimes.base import TensorSpec
from meshpb import pb

_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def batches(inputs: Iterable[TensorSpec]) -> bool:
    """Does a model with these inputs take a batch in their first dimension (Triton's max_batch_size > 0)?"""
    shapes = [spec.shape for spec in inputs]
    return bool(shapes) and all(shape and shape[0] == -1 for shape in shapes)


@dataclass(slots=True)
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class _Counters:
    batched: bool
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    durations: dict[str, _Duration] = field(default_factory=lambda: {k: _Duration() for k in _DURATIONS})
    batch_sizes: dict[int, _Duration] = field(default_factory=dict)  # batch size -> compute_infer


class ModelStatistics:
    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock  # last_inference is wall time, in ms since the epoch
        self._counters: dict[tuple[str, str], _Counters] = {}

    def finished(self, name: str, version: str, inputs: tuple[TensorSpec, ...], request: pb.ModelInferRequest,
                 started: float, began: float, ended: float, ok: bool) -> None:
        """A run of `request` ended (perf_counter seconds: entered the node, called the runtime, answered)."""
        counters = self._counters.get((name, version))
        if counters is None:
            counters = self._counters[(name, version)] = _Counters(batched=batches(inputs))
        durations = counters.durations
        total_ns = int((ended - started) * 1e9)
        counters.last_inference_ms = int(self._wall_clock() * 1000)
        if not ok:
            durations["fail"].add(total_ns)
            return
        size = 1
        if counters.batched and request.inputs and request.inputs[0].shape:
            size = max(1, request.inputs[0].shape[0])
        compute_ns = int((ended - began) * 1e9)
        durations["success"].add(total_ns)
        durations["queue"].add(int((began - started) * 1e9))
        durations["compute_input"].add(0)
        durations["compute_infer"].add(compute_ns)
        durations["compute_output"].add(0)
        counters.inference_count += size
        counters.execution_count += 1
        by_size = counters.batch_sizes.get(size)
        if by_size is None:
            by_size = counters.batch_sizes[size] = _Duration()
        by_size.add(compute_ns)

    def forget(self, name: str) -> None:
        """The model is gone from the mesh (unregistered): Triton drops an unloaded model's statistics too."""
        for key in [k for k in self._counters if k[0] == name]:
            del self._counters[key]

    def report(self, name: str = "", version: str = "") -> list[Any]:
        """Triton's ModelStatistics messages for the model (every model when "") and version (every one)."""
        return [_message(key, counters) for key, counters in sorted(self._counters.items())
                if (not name or key[0] == name) and (not version or key[1] == version)]


def _message(key: tuple[str, str], counters: _Counters) -> Any:
    def duration(d: _Duration) -> Any:
        return triton_pb.StatisticDuration(count=d.count, ns=d.ns)

    return triton_pb.ModelStatistics(
        name=key[0], version=key[1], last_inference=counters.last_inference_ms,
        inference_count=counters.inference_count, execution_count=counters.execution_count,
        inference_stats=triton_pb.InferStatistics(
            **{k: duration(d) for k, d in counters.durations.items()}),
        batch_stats=[triton_pb.InferBatchStatistics(batch_size=size, compute_input=duration(_Duration(d.count)),
                                                    compute_infer=duration(d),
                                                    compute_output=duration(_Duration(d.count)))
                     for size, d in sorted(counters.batch_sizes.items())],
    )


def merge(reports: Iterable[Iterable[Any]]) -> list[Any]:
    """Several nodes' ModelStatistics summed per model and version (the latest last_inference wins)."""
    merged: dict[tuple[str, str], Any] = {}
    for report in reports:
        for stats in report:
            key = (stats.name, stats.version)
            found = merged.get(key)
            if found is None:
                merged[key] = found = triton_pb.ModelStatistics(name=stats.name, version=stats.version)
            found.last_inference = max(found.last_inference, stats.last_inference)
            found.inference_count += stats.inference_count
            found.execution_count += stats.execution_count
            for kind in (*_DURATIONS, "cache_hit", "cache_miss"):
                _add(getattr(found.inference_stats, kind), getattr(stats.inference_stats, kind))
            sizes = {b.batch_size: b for b in found.batch_stats}
            for batch in stats.batch_stats:
                into = sizes.get(batch.batch_size)
                if into is None:
                    into = sizes[batch.batch_size] = found.batch_stats.add(batch_size=batch.batch_size)
                for kind in ("compute_input", "compute_infer", "compute_output"):
                    _add(getattr(into, kind), getattr(batch, kind))
    return [merged[key] for key in sorted(merged)]


def _add(into: Any, duration: Any) -> None:
    into.count += duration.count
    into.ns += duration.ns
