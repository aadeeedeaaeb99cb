"""ONNX Runtime in process: thousands of sessions without a thread each, sized by measurement.

Measured on the 2-core dev machines with ORT 1.31:
- A session with one intra-op thread runs on its caller and starts no thread; 1,000 of them add 0
  threads and ~0.1 MB each, exactly as with ORT's global pool, and run as fast. The global pool is
  therefore used only for intra_op_threads > 1, because it is a one-way switch for the process: after
  it, ORT refuses every session with per-session threads (the default), e.g. in other libraries/tests.
- InferenceSession creation releases the GIL both while parsing the model and while initializing
  the session, so creating it in a worker thread keeps the event loop serving: max stall 1-20 ms
  while a 50 MB model loads for 160-500 ms (73 ms once, on a machine at load average 7).
- Tiny models (~15 us) are fastest run inline on the event loop: a thread-pool hop costs ~90 us,
  several times the run. Slow ones must leave the loop. Each model decides from its own run time.
- Run time is thread CPU time, not wall time. Wall time also counts preemption and, off the loop,
  waiting for the GIL: with it ~1% of a tiny model's calls went off the loop after multi-ms spikes;
  with thread_time none did, for ~0.4 us more per call.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import mmap
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from meshnode.errors import Internal, InvalidInput, LoadFailed, ModelUnavailable
from meshnode.runtimes.base import CallerMetadata, LoadedModel, RuntimeSettings, TensorSpec
from meshnode.runtimes.onnx_sequences import SequenceBatcher, sequence_batcher
from meshnode.runtimes.tensors import (
    SpecIndex,
    datatype_of_onnx,
    decode_inputs,
    encode_response,
    index_specs,
    requested_outputs,
)
from meshnode.storage.repository import ModelSource, files_bytes
from meshpb import pb
from router.errors import MeshError

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
# Measured resident bytes per file byte after trim: ~1.57-1.66 for MLPs of 1-50 MB, because ORT keeps a
# pre-packed copy of MatMul/Gemm/Conv weights; ~1.0 for graphs without such weights. Plus ~0.1 MB per
# session. Over-predicting only reserves room a little early; the measured size replaces it after load.
PREDICT_FACTOR = 1.6
PREDICT_OVERHEAD_BYTES = 128 * 1024
# Runs timed before a model may go inline; the first is discarded because ORT sizes its arena then.
PROBE_RUNS = 5
EWMA_ALPHA = 0.2
# Warnings (e.g. per-session notes on ignored options) would be logged for each of thousands of sessions.
ORT_LOG_ERRORS_ONLY = 3

# Identity float[1] -> float[1] (opset 17), serialized by onnx.helper and kept as bytes so that this
# module does not import onnx (0.26 s). Creating it once makes ORT do its one-time process setup
# (~6.7 MB of kernel registries) before the first measurement, which would otherwise charge it to a model.
_WARMUP_MODEL = (
    b'\x08\x08:7\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x01wZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04'
    b"\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x11"
)

_pool_lock = threading.Lock()
_pool_threads: int | None = None


def _global_pool_threads(intra_op_threads: int) -> int | None:
    """The process's ORT global intra-op pool size, creating the pool if more than one thread is asked.

    None: there is no global pool, so sessions use one intra-op thread of their own (their caller).
    The pool can be created once per process; later runtimes share the first one's size.
    """
    global _pool_threads
    with _pool_lock:
        if _pool_threads is None:
            if intra_op_threads > 1:
                ort.set_global_thread_pool_sizes(intra_op_threads, 1)
                _pool_threads = intra_op_threads
        elif _pool_threads != intra_op_threads:
            log.warning(
                "ORT global thread pool already has %d intra-op threads; %d requested is ignored",
                _pool_threads,
                intra_op_threads,
            )
        return _pool_threads


def _malloc_trim() -> Callable[[], None]:
    """glibc keeps freed memory mapped; trimming before each RSS reading makes the readings comparable."""
    libc_name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None
    if trim is None:  # not glibc (musl, macOS): readings are noisier, the file-size floor still holds
        return lambda: None
    return lambda: trim(0)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * mmap.PAGESIZE
    except OSError:  # no procfs: the measured delta becomes 0 and the file-size floor decides
        return 0


def _specs(args: Sequence[ort.NodeArg]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(
            a.name,
            datatype_of_onnx(a.type),
            tuple(d if isinstance(d, int) and d >= 0 else -1 for d in a.shape),
        )
        for a in args
    )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class OnnxModel:
    """One loaded session. `inline` is the current run-on-the-event-loop decision."""

    platform = PLATFORM

    def __init__(
        self,
        source: ModelSource,
        session: ort.InferenceSession,
        size_bytes: int,
        executor: ThreadPoolExecutor,
        inline_threshold_s: float,
        clock: Callable[[], float],
        sequences: SequenceBatcher | None = None,
    ) -> None:
        self.name = source.name
        self.version = source.version
        self.size_bytes = size_bytes
        self._session: ort.InferenceSession | None = session
        self.sequences = sequences  # None: each request stands alone, whatever its sequence flags say
        self.on_caller = sequences is None  # a sequence's state is kept on the loop (runtimes.base.AnswersOnCaller)
        self.inputs = _specs(session.get_inputs())
        self.outputs = _specs(session.get_outputs())
        if sequences is not None:  # control and state tensors are the batcher's, not the client's
            self.inputs, self.outputs = sequences.client_inputs(self.inputs), sequences.client_outputs(self.outputs)
        self._input_index: SpecIndex = index_specs(self.inputs)
        self._output_index: SpecIndex = index_specs(self.outputs)
        self._executor = executor
        self._threshold_s = inline_threshold_s
        self._clock = clock
        self.inline = False
        self.run_ewma_s = 0.0
        self._probed = 0

    async def infer(self, request: pb.ModelInferRequest, timeout_s: float | None = None,
                    caller_metadata: CallerMetadata | None = None) -> pb.ModelInferResponse:
        feeds = decode_inputs(request, self._input_index, self.name)
        names = requested_outputs(request, self._output_index, self.name)
        if self.sequences is None:
            arrays = await self._execute(names, feeds)
        else:
            arrays = await self.sequences.run(request, names, feeds, self._execute)
        return encode_response(request, self.name, self.version, names, arrays)

    async def _execute(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.inline:
            start = self._clock()
            arrays = self._run(names, feeds)
            self.run_ewma_s += EWMA_ALPHA * (self._clock() - start - self.run_ewma_s)
            if self.run_ewma_s > self._threshold_s:
                self.inline = False
        else:
            options = ort.RunOptions()
            run = asyncio.get_running_loop().run_in_executor(self._executor, self._timed_run, names, feeds, options)
            try:
                arrays = await run
            except asyncio.CancelledError:
                # The request was abandoned (a model timeout, the client gone): stop the run, free its worker.
                options.terminate = True
                raise
        return arrays

    def infer_now(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """Answer on the calling thread (a threaded server's worker): ONNX Runtime releases the GIL as it runs."""
        feeds = decode_inputs(request, self._input_index, self.name)
        names = requested_outputs(request, self._output_index, self.name)
        return encode_response(request, self.name, self.version, names, self._run(names, feeds))

    def _run(self, names: list[str], feeds: dict[str, np.ndarray],
             options: ort.RunOptions | None = None) -> list[np.ndarray]:
        session = self._session
        if session is None:
            raise ModelUnavailable(f"model '{self.name}' version {self.version} is unloaded")
        try:
            arrays: list[np.ndarray] = session.run(names, feeds, options)
            return arrays
        except InvalidArgument as error:
            raise InvalidInput(f"model '{self.name}': {_first_line(error)}") from None
        except Exception as error:
            raise Internal(f"inference failed for model '{self.name}': {_first_line(error)}") from error

    def _timed_run(self, names: list[str], feeds: dict[str, np.ndarray], options: ort.RunOptions) -> list[np.ndarray]:
        start = self._clock()
        arrays = self._run(names, feeds, options)
        self._observe(self._clock() - start)
        return arrays

    def _observe(self, seconds: float) -> None:
        self._probed += 1
        if self._probed == 1:
            return
        if self._probed == 2:
            self.run_ewma_s = seconds
        else:
            self.run_ewma_s += EWMA_ALPHA * (seconds - self.run_ewma_s)
        if self._probed >= PROBE_RUNS:
            self.inline = self.run_ewma_s < self._threshold_s

    def release(self) -> bool:
        """Drop the session; runs already in flight keep their reference and finish. True if it was held."""
        session, self._session = self._session, None
        return session is not None


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(
        self,
        *,
        intra_op_threads: int = 1,
        load_workers: int = 2,
        infer_workers: int = 2,
        inline_threshold_ms: float = 0.5,
    ) -> None:
        self._global_pool_threads = _global_pool_threads(intra_op_threads)
        # With one intra-op thread the calling thread does all of a run's work, so its CPU time is the
        # run's cost; with more, pool threads do part of it and only wall time shows the loop's wait.
        self._clock = time.thread_time if self._global_pool_threads in (None, 1) else time.perf_counter
        self._inline_threshold_s = inline_threshold_ms / 1000.0
        # Extra load workers buy little: session creation is serialized by _measure_lock so that each
        # RSS delta belongs to one session; they only let the next load check its files meanwhile.
        self._load_pool = ThreadPoolExecutor(load_workers, thread_name_prefix="ort-load")
        self._infer_pool = ThreadPoolExecutor(infer_workers, thread_name_prefix="ort-infer")
        # One load's RSS delta is only its own if no other load or trim runs in between.
        self._measure_lock = threading.Lock()
        self._trim = _malloc_trim()
        self._warmed_up = False
        self._closed = False

    async def healthy(self) -> bool:
        return True  # in process: while the node runs, so does its runtime

    def predict_size(self, source: ModelSource) -> int:
        try:
            return int(files_bytes(source) * PREDICT_FACTOR) + PREDICT_OVERHEAD_BYTES
        except OSError:
            return PREDICT_OVERHEAD_BYTES

    async def load(self, source: ModelSource) -> OnnxModel:
        return await asyncio.get_running_loop().run_in_executor(self._load_pool, self._load, source)

    def _load(self, source: ModelSource) -> OnnxModel:
        where = f"model '{source.name}' version {source.version} from {source.model_file}"
        if not source.model_file.is_file():
            raise LoadFailed(f"failed to load {where}: file not found")
        try:
            on_disk = files_bytes(source)
        except OSError as error:
            raise LoadFailed(f"failed to load {where}: {error}") from None
        options = self._session_options()
        with self._measure_lock:
            if not self._warmed_up:
                ort.InferenceSession(_WARMUP_MODEL, options, providers=["CPUExecutionProvider"])
                self._warmed_up = True
            self._trim()
            before = _rss_bytes()
            try:
                session = ort.InferenceSession(str(source.model_file), options, providers=["CPUExecutionProvider"])
            except Exception as error:
                self._trim()  # give back what the failed parse allocated
                raise LoadFailed(f"failed to load {where}: {_first_line(error)}") from None
            self._trim()
            measured = _rss_bytes() - before
        try:
            return OnnxModel(
                source,
                session,
                max(measured, on_disk),
                self._infer_pool,
                self._inline_threshold_s,
                self._clock,
                sequence_batcher(source, _specs(session.get_inputs()), _specs(session.get_outputs())),
            )
        except MeshError as error:  # an input or output type the protocol cannot carry
            raise LoadFailed(f"failed to load {where}: {error}") from None

    def _session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = ORT_LOG_ERRORS_ONLY
        if self._global_pool_threads is None:
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
        else:
            options.use_per_session_threads = False
        return options

    async def start(self) -> None:
        pass  # in process: nothing to reach, nothing left from before

    async def unload(self, model: LoadedModel) -> None:
        if not isinstance(model, OnnxModel):
            raise TypeError(f"{self.name} cannot unload a {type(model).__name__}")
        if model.release() and not self._closed:
            await asyncio.get_running_loop().run_in_executor(self._load_pool, self._trim_locked)

    def _trim_locked(self) -> None:
        with self._measure_lock:
            self._trim()

    async def close(self) -> None:
        self._closed = True
        for pool in (self._load_pool, self._infer_pool):
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


def create(settings: RuntimeSettings) -> OnnxRuntime:
    return OnnxRuntime(
        intra_op_threads=settings.intra_op_threads, load_workers=settings.load_concurrency,
        infer_workers=settings.infer_workers, inline_threshold_ms=settings.inline_threshold_ms,
    )
