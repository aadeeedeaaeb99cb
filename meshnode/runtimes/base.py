"""The runtime contract: what the node needs from ONNX Runtime, Triton, or any third runtime.

A runtime turns a model directory into a LoadedModel; a LoadedModel answers inference requests
in protocol form, so a pass-through runtime (Triton) never decodes tensors and an in-process one
(ONNX Runtime) decodes only what it must. Adding a runtime means adding one module with a class
that satisfies Runtime.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from meshnode.storage.repository import ModelSource
from meshpb import pb

CallerMetadata = Callable[[], Iterable[tuple[str, Any]] | None]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output as the protocol describes it; -1 marks a variable dimension."""

    name: str
    datatype: str  # KServe name: FP32, INT64, BYTES, ...
    shape: tuple[int, ...]


class LoadedModel(Protocol):
    name: str
    version: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    size_bytes: int

    async def infer(self, request: pb.ModelInferRequest, timeout_s: float | None = None,
                    caller_metadata: CallerMetadata | None = None) -> pb.ModelInferResponse:
        """Answer one request; raise meshnode.errors.InvalidInput for bad tensors.

        For a runtime that calls out (Triton): timeout_s is what is left of the client's deadline, and
        caller_metadata reads the client's gRPC metadata (trace context), only if called.
        """
        ...


@runtime_checkable
class AnswersOnCaller(Protocol):
    """A LoadedModel that can answer on the calling thread, without the event loop (an in-process runtime whose
    runs release the GIL): the threaded server runs local hits on it from its worker threads."""

    on_caller: bool  # False: this model answers through `infer` only (a sequence model, say)

    def infer_now(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """As `infer`, synchronously; raises ModelUnavailable once the model is unloaded."""
        ...


ResponseSink = Callable[[pb.ModelStreamInferResponse], Awaitable[None]]


class InferStream(Protocol):
    """Requests of one client stream, sent in order; their responses go to the stream's sink as produced."""

    @property
    def open(self) -> bool: ...

    async def send(self, request: pb.ModelInferRequest) -> None: ...

    async def finish(self) -> None:
        """No more requests: wait until every response of those sent has gone to the sink."""
        ...

    def cancel(self) -> None:
        """The client went away: end the work of every request sent."""
        ...


@runtime_checkable
class StreamingModel(Protocol):
    """A LoadedModel whose runtime streams (Triton: decoupled models answer many times, or never, per request).
    A model without it answers each request of a stream with its one response."""

    def open_stream(self, sink: ResponseSink, caller_metadata: CallerMetadata | None = None) -> InferStream: ...


class Runtime(Protocol):
    name: str

    async def start(self) -> None:
        """Before the node serves: reach the runtime, and clear what an earlier node left in it."""
        ...

    async def healthy(self) -> bool:
        """Does the runtime answer now? Asked twice a second; False makes the node withdraw its copies."""
        ...

    def predict_size(self, source: ModelSource) -> int:
        """Fast size estimate in bytes before loading (no model parsing)."""
        ...

    async def load(self, source: ModelSource) -> LoadedModel:
        """Load without blocking the event loop; size_bytes is measured, not declared."""
        ...

    async def unload(self, model: LoadedModel) -> None:
        """Release the model; idempotent."""
        ...

    async def close(self) -> None: ...


class RuntimeSettings(Protocol):
    """What a runtime is made from: the node's settings (meshnode.settings.NodeSettings) as runtimes read
    them, so that runtimes depend on no layer above them."""

    @property
    def runtime(self) -> str: ...
    @property
    def load_concurrency(self) -> int: ...
    @property
    def infer_workers(self) -> int: ...
    @property
    def inline_threshold_ms(self) -> float: ...
    @property
    def intra_op_threads(self) -> int: ...
    @property
    def triton_url(self) -> str | None: ...
    @property
    def triton_model_repository(self) -> Path | None: ...
