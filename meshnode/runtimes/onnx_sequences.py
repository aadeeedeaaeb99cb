"""Triton's sequence batcher for in-process ONNX Runtime models: control inputs and implicit state.

A model whose config.pbtxt has `sequence_batching` is run as Triton's onnxruntime backend runs it. Its
`control_input`s (START, END, READY, CORRID) are graph inputs the client never sends: each run gets them built
from the request's `sequence_id` / `sequence_start` / `sequence_end`. Its `state`s are graph input/output pairs
kept here per sequence: a START runs with the initial state (zeros, or `initial_state`'s zero_data or data_file),
every later request with the output state of the one before, and an END drops it. A state output is returned
only when the config's `output` section lists it, as Triton lets a client see state only then.

A sequence idle past `max_sequence_idle_microseconds` is dropped the next time any request reaches the model, so
what is held is bounded by the sequences active within one idle limit. Runs of one sequence are serialized in
arrival order (the state of one is the input of the next); sequences do not wait for each other.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2

from meshnode.errors import InvalidInput, LoadFailed
from meshnode.runtimes.base import TensorSpec
from meshnode.runtimes.tensors import DATATYPE_TO_NUMPY
from meshnode.storage.repository import ModelSource
from meshnode.storage.versions import read_config
from meshpb import pb
from router.sequences import SequenceFlags, sequence_of

DEFAULT_IDLE_S = 1.0  # Triton's max_sequence_idle_microseconds when the config does not set it
INITIAL_STATE_DIR = "initial_state"  # Triton's folder of data_file initial states, in the model directory

Execute = Callable[[list[str], dict[str, np.ndarray]], Awaitable[list[np.ndarray]]]
_Kind = model_config_pb2.ModelSequenceBatching.Control
_BOOLEAN_KINDS = {_Kind.CONTROL_SEQUENCE_START, _Kind.CONTROL_SEQUENCE_END, _Kind.CONTROL_SEQUENCE_READY}
_CORRID_TYPES = frozenset({"UINT64", "INT64", "UINT32", "INT32", "BYTES"})


def _datatype(config_type: int) -> str:
    """TYPE_FP32 -> FP32, TYPE_STRING -> BYTES: the protocol's names for a config's data types."""
    name = model_config_pb2.DataType.Name(config_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


@dataclass(frozen=True, slots=True)
class Control:
    """One control input: the tensor it gets for a request, [1] or [1, 1] for a batching model, as Triton's."""

    name: str
    kind: int
    datatype: str
    false_true: tuple[object, object] = (None, None)  # the boolean kinds' values

    def tensor(self, sequence: SequenceFlags, shape: tuple[int, ...], model: str) -> np.ndarray:
        dtype = DATATYPE_TO_NUMPY[self.datatype]
        if self.kind == _Kind.CONTROL_SEQUENCE_CORRID:
            if isinstance(sequence.id, str) != (self.datatype == "BYTES"):
                raise InvalidInput(f"sequence id {sequence} of model '{model}' does not fit its CORRID control "
                                   f"'{self.name}' of type {self.datatype}")
            try:
                return np.full(shape, sequence.id, dtype)
            except OverflowError:
                raise InvalidInput(f"sequence id {sequence} of model '{model}' is out of range for its CORRID "
                                   f"control '{self.name}' of type {self.datatype}") from None
        if self.kind == _Kind.CONTROL_SEQUENCE_START:
            on = sequence.start
        elif self.kind == _Kind.CONTROL_SEQUENCE_END:
            on = sequence.end
        else:  # READY: a run happens only for a request that is there
            on = True
        return np.full(shape, self.false_true[int(on)], dtype)


@dataclass(frozen=True, slots=True)
class State:
    input_name: str
    output_name: str
    initial: np.ndarray  # read-only: every start shares it


@dataclass(slots=True)
class _Open:
    """One sequence held here: its runs' turn, its states (None until a run left some), when it was last used."""

    used: float
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    states: dict[str, np.ndarray] | None = None


class SequenceBatcher:
    def __init__(self, model: str, controls: Sequence[Control], states: Sequence[State], *, visible_outputs:
                 Iterable[str], batching: bool, idle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._model = model
        self._controls = tuple(controls)
        self._states = tuple(states)
        self._hidden_inputs = {c.name for c in controls} | {s.input_name for s in states}
        shown = set(visible_outputs)
        self._hidden_outputs = {s.output_name for s in states if s.output_name not in shown}
        self._batching = batching
        self._control_shape = (1, 1) if batching else (1,)
        self._idle_s = idle_s
        self._clock = clock
        self._open: OrderedDict[int | str, _Open] = OrderedDict()  # least recently used first

    def client_inputs(self, inputs: Iterable[TensorSpec]) -> tuple[TensorSpec, ...]:
        """The model's inputs a client sends: neither control nor state inputs."""
        return tuple(spec for spec in inputs if spec.name not in self._hidden_inputs)

    def client_outputs(self, outputs: Iterable[TensorSpec]) -> tuple[TensorSpec, ...]:
        """The model's outputs a client may ask for: state outputs only when the config lists them."""
        return tuple(spec for spec in outputs if spec.name not in self._hidden_outputs)

    def open_count(self) -> int:
        return len(self._open)

    async def run(self, request: pb.ModelInferRequest, names: list[str], feeds: dict[str, np.ndarray],
                  execute: Execute) -> list[np.ndarray]:
        """Run the request in its sequence's turn with control and state inputs; the arrays of `names`."""
        now = self._clock()
        sequence = self._admit(request, feeds, now)
        held = self._open.get(sequence.id)
        if sequence.start and held is None:
            held = self._open[sequence.id] = _Open(now)
        if held is None:
            raise InvalidInput(f"inference request for sequence {sequence} to model '{self._model}' must specify "
                               "the START flag on the first request of the sequence")
        held.used = now
        self._open.move_to_end(sequence.id)
        if sequence.end:  # as Triton: a request after the end must start again, even while this one waits
            del self._open[sequence.id]
        async with held.turn:
            previous = None if sequence.start else held.states
            run_feeds = dict(feeds)
            for control in self._controls:
                run_feeds[control.name] = control.tensor(sequence, self._control_shape, self._model)
            for state in self._states:
                run_feeds[state.input_name] = state.initial if previous is None else previous[state.input_name]
            extra = [s.output_name for s in self._states if s.output_name not in names]
            arrays = await execute(names + extra, run_feeds)
            by_name = dict(zip(names + extra, arrays, strict=True))
            if not sequence.end:
                held.states = {s.input_name: by_name[s.output_name] for s in self._states}
        return arrays[: len(names)]

    def _admit(self, request: pb.ModelInferRequest, feeds: dict[str, np.ndarray], now: float) -> SequenceFlags:
        """The request's sequence, after dropping idle ones; Triton's errors for a request it would refuse."""
        self._drop_idle(now - self._idle_s)
        if self._batching and any(a.ndim and a.shape[0] > 1 for a in feeds.values()):
            raise InvalidInput(f"inference request to model '{self._model}' must specify batch-size 1 due to "
                               "requirements of sequence batcher")
        sequence = sequence_of(request.parameters)
        if sequence is None:
            raise InvalidInput(f"inference request to model '{self._model}' must specify a non-zero or non-empty "
                               "correlation ID")
        return sequence

    def _drop_idle(self, used_before: float) -> None:
        while self._open and next(iter(self._open.values())).used <= used_before:
            self._open.popitem(last=False)


def sequence_batcher(source: ModelSource, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                     clock: Callable[[], float] = time.monotonic) -> SequenceBatcher | None:
    """The batcher of a model whose config.pbtxt declares sequence batching, None for any other model.

    `inputs` and `outputs` are the graph's; a control or state the graph lacks, or of another type, is LoadFailed.
    """
    model_dir = source.directory.parent
    if not source.directory.name.isdigit():  # a single model file, without a config beside it
        return None
    config = read_config(model_dir, source.config_override)
    if not config.HasField("sequence_batching"):
        return None
    batching = config.sequence_batching
    graph_inputs = {spec.name: spec for spec in inputs}
    graph_outputs = {spec.name: spec for spec in outputs}
    controls = [_control(control_input.name, control, graph_inputs)
                for control_input in batching.control_input for control in control_input.control]
    if len({c.name for c in controls}) != len(controls):
        raise LoadFailed("a sequence batching control input has more than one control")
    states = [_state(state, config.max_batch_size > 0, model_dir, graph_inputs, graph_outputs)
              for state in batching.state]
    idle_us = batching.max_sequence_idle_microseconds
    return SequenceBatcher(source.name, controls, states, visible_outputs=[o.name for o in config.output],
                           batching=config.max_batch_size > 0, idle_s=idle_us / 1e6 if idle_us else DEFAULT_IDLE_S,
                           clock=clock)


def _check(name: str, datatype: str, specs: dict[str, TensorSpec], what: str) -> None:
    spec = specs.get(name)
    if spec is None:
        raise LoadFailed(f"sequence batching {what} '{name}' is not in the model")
    if spec.datatype != datatype:
        raise LoadFailed(f"sequence batching {what} '{name}' is {datatype} in the config but {spec.datatype} in "
                         "the model")


def _control(name: str, control: model_config_pb2.ModelSequenceBatching.Control,
             graph_inputs: dict[str, TensorSpec]) -> Control:
    if control.kind == _Kind.CONTROL_SEQUENCE_CORRID:
        datatype = _datatype(control.data_type)
        if datatype not in _CORRID_TYPES:
            raise LoadFailed(f"CORRID control '{name}' must be UINT64, INT64, UINT32, INT32 or STRING, not {datatype}")
        _check(name, datatype, graph_inputs, "control input")
        return Control(name, control.kind, datatype)
    if control.kind not in _BOOLEAN_KINDS:
        raise LoadFailed(f"control input '{name}' has an unknown kind {control.kind}")
    choices = [(datatype, values) for datatype, values in (("FP32", control.fp32_false_true),
               ("INT32", control.int32_false_true), ("BOOL", control.bool_false_true)) if values]
    if len(choices) != 1 or len(choices[0][1]) != 2:
        raise LoadFailed(f"control input '{name}' must set exactly one of fp32_false_true, int32_false_true or "
                         "bool_false_true, with two values")
    datatype, values = choices[0]
    _check(name, datatype, graph_inputs, "control input")
    return Control(name, control.kind, datatype, (values[0], values[1]))


def _state(state: model_config_pb2.ModelSequenceBatching.State, batching: bool, model_dir: Path,
           graph_inputs: dict[str, TensorSpec], graph_outputs: dict[str, TensorSpec]) -> State:
    datatype = _datatype(state.data_type)
    _check(state.input_name, datatype, graph_inputs, "state input")
    _check(state.output_name, datatype, graph_outputs, "state output")
    batch = (1,) if batching else ()
    if not state.initial_state:
        # Triton leaves this state uninitialized with 1 for each variable dimension; zeros make runs repeatable.
        shape = batch + tuple(d if d >= 0 else 1 for d in state.dims)
        return State(state.input_name, state.output_name, _frozen(np.zeros(shape, DATATYPE_TO_NUMPY[datatype])))
    if len(state.initial_state) > 1:
        raise LoadFailed(f"state input '{state.input_name}' has more than one initial_state")
    initial = state.initial_state[0]
    if len(initial.dims) != len(state.dims) or any(d < 0 for d in initial.dims):
        raise LoadFailed(f"initial_state of state input '{state.input_name}' must have the state's "
                         f"{len(state.dims)} dimensions, none variable")
    if _datatype(initial.data_type) != datatype:
        raise LoadFailed(f"initial_state of state input '{state.input_name}' is not {datatype}")
    shape = batch + tuple(initial.dims)
    dtype = DATATYPE_TO_NUMPY[datatype]
    which = initial.WhichOneof("state_data")
    if which == "zero_data":
        data = np.zeros(shape, dtype) if datatype != "BYTES" else np.full(shape, "", dtype)
    elif which == "data_file" and datatype != "BYTES":
        data = _from_file(model_dir, initial.data_file, shape, dtype)
    else:
        raise LoadFailed(f"initial_state of state input '{state.input_name}' must set zero_data, or data_file "
                         "for a numeric state")
    return State(state.input_name, state.output_name, _frozen(data))


def _from_file(model_dir: Path, data_file: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    folder = (model_dir / INITIAL_STATE_DIR).resolve()
    path = (folder / data_file).resolve()
    # Messages name the file as the config does: the node's own paths stay out of what clients see.
    if not path.is_relative_to(folder):
        raise LoadFailed(f"initial_state data_file '{data_file}' is outside {INITIAL_STATE_DIR}/")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise LoadFailed(f"cannot read initial_state data_file '{data_file}': "
                         f"{error.strerror}") from None
    size = int(np.prod(shape)) * dtype.itemsize
    if len(raw) < size:
        raise LoadFailed(f"initial_state setting expects {size} bytes, but the data "
                         f"provided from {data_file} only has {len(raw)} bytes.")
    return np.frombuffer(raw[:size], dtype).reshape(shape)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array
