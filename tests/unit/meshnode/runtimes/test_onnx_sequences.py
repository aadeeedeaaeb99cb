"""ONNX Runtime models with sequence batching: control inputs and implicit state, as Triton's onnxruntime backend.

The batcher alone with a fake run (clock, turns, cancellation), then real sessions loaded by OnnxRuntime.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2

from deploy.local import models as examples
from meshnode.errors import InvalidInput, LoadFailed
from meshnode.runtimes.base import TensorSpec
from meshnode.runtimes.onnx import OnnxModel, OnnxRuntime
from meshnode.runtimes.onnx_sequences import SequenceBatcher, sequence_batcher
from meshpb import pb
from tests.unit.meshnode.runtimes.test_onnx_runtime import make_request, outputs_of, source

STATE = 'state [ { input_name: "STATE_IN" output_name: "STATE_OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]'
START_ERROR = "must specify the START flag on the first request of the sequence"


def sequence_request(model: str, value: int, sequence_id: int | str, *, start: bool = False, end: bool = False,
                     outputs: tuple[str, ...] = ()) -> pb.ModelInferRequest:
    request = make_request(model, {"INPUT": ("INT32", np.array([[value]], np.int32))}, outputs)
    if isinstance(sequence_id, str):
        request.parameters["sequence_id"].string_param = sequence_id
    else:
        request.parameters["sequence_id"].int64_param = sequence_id
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end
    return request


async def total(model: OnnxModel, value: int, sequence_id: int | str, *, start: bool = False, end: bool = False) -> int:
    request = sequence_request(model.name, value, sequence_id, start=start, end=end)
    return int(outputs_of(await model.infer(request))["OUTPUT"][0, 0])


@pytest.fixture
async def runtime() -> AsyncIterator[OnnxRuntime]:
    rt = OnnxRuntime()
    yield rt
    await rt.close()


# --- the batcher with a fake run: a running sum, and the control tensors it was given ---

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write_config(tmp_path: Path, sequence_batching: str, *, outputs: str = "") -> Path:
    """A model directory with only a config (the batcher needs no model file), version 1."""
    model_dir = tmp_path / "seq"
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(f'max_batch_size: 1\nsequence_batching {{ {sequence_batching} }}\n'
                                            f"{outputs}")
    return model_dir


GRAPH_INPUTS = (TensorSpec("INPUT", "INT32", (-1, 1)), TensorSpec("STATE_IN", "INT32", (-1, 1)),
                TensorSpec("START", "FP32", (-1, 1)), TensorSpec("END", "INT32", (-1, 1)),
                TensorSpec("READY", "BOOL", (-1, 1)), TensorSpec("CORRID", "UINT64", (-1, 1)))
GRAPH_OUTPUTS = (TensorSpec("OUTPUT", "INT32", (-1, 1)), TensorSpec("STATE_OUT", "INT32", (-1, 1)))


def batcher(tmp_path: Path, clock: Clock, extra: str = "", idle_us: int = 1_000_000) -> SequenceBatcher:
    config = write_config(tmp_path, f"max_sequence_idle_microseconds: {idle_us} {STATE} {extra}")
    made = sequence_batcher(source(config), GRAPH_INPUTS, GRAPH_OUTPUTS, clock)
    assert made is not None
    return made


class FakeRun:
    """OUTPUT = STATE_OUT = STATE_IN + INPUT; records each run's feeds; `gate`, when set, holds runs until opened."""

    def __init__(self) -> None:
        self.feeds: list[dict[str, np.ndarray]] = []
        self.gate: asyncio.Event | None = None
        self._started = asyncio.Condition()

    async def started(self, count: int) -> None:
        """Until `count` runs have started."""
        async with asyncio.timeout(5), self._started:
            await self._started.wait_for(lambda: len(self.feeds) >= count)

    async def __call__(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        async with self._started:
            self.feeds.append(feeds)
            self._started.notify_all()
        if self.gate is not None:
            await self.gate.wait()
        summed = feeds["STATE_IN"] + feeds["INPUT"]
        return [summed.copy() for _ in names]


async def run(seq: SequenceBatcher, fake: FakeRun, value: int, sequence_id: int | str, *, start: bool = False,
              end: bool = False) -> int:
    request = sequence_request("seq", value, sequence_id, start=start, end=end)
    feeds = {"INPUT": np.array([[value]], np.int32)}
    (output,) = await seq.run(request, ["OUTPUT"], feeds, fake)
    return int(output.reshape(-1)[0])


async def test_state_carries_from_each_request_to_the_next_and_end_drops_it(tmp_path: Path) -> None:
    seq, fake = batcher(tmp_path, Clock()), FakeRun()
    assert [await run(seq, fake, v, 7, start=v == 1) for v in (1, 2, 3)] == [1, 3, 6]
    assert await run(seq, fake, 4, 7, end=True) == 10
    assert seq.open_count() == 0
    with pytest.raises(InvalidInput, match=f"inference request for sequence 7 to model 'seq' {START_ERROR}"):
        await run(seq, fake, 1, 7)
    assert await run(seq, fake, 5, 7, start=True) == 5  # started again: from the initial state


async def test_a_start_of_an_open_sequence_restarts_it_from_the_initial_state(tmp_path: Path) -> None:
    seq, fake = batcher(tmp_path, Clock()), FakeRun()
    assert await run(seq, fake, 3, 1, start=True) == 3
    assert await run(seq, fake, 4, 1, start=True) == 4


async def test_sequences_keep_their_own_states_whatever_the_interleaving(tmp_path: Path) -> None:
    seq, fake = batcher(tmp_path, Clock()), FakeRun()
    assert await run(seq, fake, 1, 1, start=True) == 1
    assert await run(seq, fake, 10, "one", start=True) == 10
    assert await run(seq, fake, 2, 1) == 3
    assert await run(seq, fake, 20, "one") == 30
    assert await run(seq, fake, 3, 1) == 6


async def test_controls_are_fed_as_the_config_says(tmp_path: Path) -> None:
    controls = ('control_input [\n'
                '{ name: "START" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] },'
                '{ name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 5, 9 ] } ] },'
                '{ name: "READY" control [ { kind: CONTROL_SEQUENCE_READY bool_false_true: [ false, true ] } ] },'
                '{ name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] } ]')
    seq, fake = batcher(tmp_path, Clock(), controls), FakeRun()
    await run(seq, fake, 1, 42, start=True)
    await run(seq, fake, 1, 42)
    await run(seq, fake, 1, 42, end=True)
    got = [{name: (a.dtype.name, a.shape, a.item()) for name, a in feeds.items() if name not in ("INPUT", "STATE_IN")}
           for feeds in fake.feeds]
    ready, corrid = ("bool", (1, 1), True), ("uint64", (1, 1), 42)
    assert got == [
        {"START": ("float32", (1, 1), 1.0), "END": ("int32", (1, 1), 5), "READY": ready, "CORRID": corrid},
        {"START": ("float32", (1, 1), 0.0), "END": ("int32", (1, 1), 5), "READY": ready, "CORRID": corrid},
        {"START": ("float32", (1, 1), 0.0), "END": ("int32", (1, 1), 9), "READY": ready, "CORRID": corrid},
    ]
    with pytest.raises(InvalidInput, match="does not fit its CORRID control 'CORRID' of type UINT64"):
        await run(seq, fake, 1, "text-id", start=True)


async def test_idle_sequences_are_dropped_and_what_is_held_stays_bounded(tmp_path: Path) -> None:
    clock = Clock()
    seq, fake = batcher(tmp_path, clock, idle_us=2_000_000), FakeRun()
    for sequence_id in range(1, 101):
        await run(seq, fake, 1, sequence_id, start=True)
    clock.now += 1.5
    assert await run(seq, fake, 1, 100) == 2  # within its idle limit: renewed
    assert seq.open_count() == 100
    clock.now += 1.0  # 2.5 s after the first 99 were last used, 1 s after sequence 100
    with pytest.raises(InvalidInput, match=START_ERROR):
        await run(seq, fake, 1, 1)
    assert seq.open_count() == 1  # every idle one went at once, without a request of its own
    assert await run(seq, fake, 1, 100) == 3


async def test_runs_of_one_sequence_take_turns_and_other_sequences_do_not_wait(tmp_path: Path) -> None:
    seq, fake = batcher(tmp_path, Clock()), FakeRun()
    await run(seq, fake, 1, 1, start=True)
    fake.gate = asyncio.Event()
    first = asyncio.create_task(run(seq, fake, 10, 1))
    second = asyncio.create_task(run(seq, fake, 100, 1))
    await fake.started(2)  # the start, then the first
    other = asyncio.create_task(run(seq, fake, 5, 2, start=True))
    await fake.started(3)  # sequence 2 runs while sequence 1's first run is held...
    assert int(fake.feeds[2]["INPUT"][0, 0]) == 5  # ...and sequence 1's second still waits for its turn
    fake.gate.set()
    assert [await first, await second, await other] == [11, 111, 5]
    assert int(fake.feeds[-1]["STATE_IN"][0, 0]) == 11  # the second run started from the first one's state


async def test_a_cancelled_run_leaves_the_state_as_it_was(tmp_path: Path) -> None:
    seq, fake = batcher(tmp_path, Clock()), FakeRun()
    await run(seq, fake, 4, 1, start=True)
    fake.gate = asyncio.Event()
    abandoned = asyncio.create_task(run(seq, fake, 50, 1))
    await fake.started(2)
    abandoned.cancel()
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    fake.gate = None
    assert await run(seq, fake, 1, 1) == 5


async def test_requests_triton_refuses_are_refused_in_its_words(tmp_path: Path) -> None:
    seq, fake = batcher(tmp_path, Clock()), FakeRun()
    outside = make_request("seq", {"INPUT": ("INT32", np.array([[1]], np.int32))})
    with pytest.raises(InvalidInput, match="inference request to model 'seq' must specify a non-zero or non-empty "
                                           "correlation ID"):
        await seq.run(outside, ["OUTPUT"], {"INPUT": np.array([[1]], np.int32)}, fake)
    with pytest.raises(InvalidInput, match="inference request to model 'seq' must specify batch-size 1 due to "
                                           "requirements of sequence batcher"):
        await seq.run(sequence_request("seq", 1, 3, start=True), ["OUTPUT"], {"INPUT": np.ones((2, 1), np.int32)},
                      fake)
    assert fake.feeds == []


@pytest.mark.parametrize(("initial_state", "expected"), [
    ("", np.zeros((1, 1, 3), np.int32)),  # no initial_state: zeros, 1 for a variable dimension
    ('initial_state { data_type: TYPE_INT32 dims: [ 2, 3 ] zero_data: true name: "z" }', np.zeros((1, 2, 3), np.int32)),
    ('initial_state { data_type: TYPE_INT32 dims: [ 2, 3 ] data_file: "six" name: "f" }',
     np.arange(6, dtype=np.int32).reshape(1, 2, 3)),
])
async def test_a_start_runs_with_the_initial_state(tmp_path: Path, initial_state: str, expected: np.ndarray) -> None:
    model_dir = write_config(tmp_path, 'state [ { input_name: "STATE_IN" output_name: "STATE_OUT" '
                                       f"data_type: TYPE_INT32 dims: [ -1, 3 ] {initial_state} }} ]")
    (model_dir / "initial_state").mkdir()
    (model_dir / "initial_state" / "six").write_bytes(np.arange(6, dtype="<i4").tobytes())
    made, fake = sequence_batcher(source(model_dir), GRAPH_INPUTS, GRAPH_OUTPUTS), FakeRun()
    assert made is not None
    for _ in range(2):  # the second start gets it unchanged by the first
        await run(made, fake, 0, 1, start=True)
        state = fake.feeds[-1]["STATE_IN"]
        np.testing.assert_array_equal(state, expected)
        assert state.dtype == expected.dtype and not state.flags.writeable


@pytest.mark.parametrize(("sequence_batching", "message"), [
    ('control_input [ { name: "GONE" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] } ]',
     "sequence batching control input 'GONE' is not in the model"),
    ('control_input [ { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] } ]',
     "sequence batching control input 'START' is INT32 in the config but FP32 in the model"),
    ('control_input [ { name: "START" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 1 ] } ] } ]',
     "control input 'START' must set exactly one of"),
    ('state [ { input_name: "STATE_IN" output_name: "NOPE" data_type: TYPE_INT32 dims: [ 1 ] } ]',
     "sequence batching state output 'NOPE' is not in the model"),
    ('state [ { input_name: "STATE_IN" output_name: "STATE_OUT" data_type: TYPE_INT32 dims: [ 2 ] '
     'initial_state { data_type: TYPE_INT32 dims: [ 2 ] data_file: "short" } } ]',
     "initial_state setting expects 8 bytes, but the data provided from short only has 4 bytes."),
    ('state [ { input_name: "STATE_IN" output_name: "STATE_OUT" data_type: TYPE_INT32 dims: [ 1 ] '
     'initial_state { data_type: TYPE_INT32 dims: [ 1 ] data_file: "../../config.pbtxt" } } ]',
     "initial_state data_file '../../config.pbtxt' is outside initial_state/"),
])
def test_configs_that_do_not_fit_the_model_fail_its_load(tmp_path: Path, sequence_batching: str,
                                                         message: str) -> None:
    model_dir = write_config(tmp_path, sequence_batching)
    (model_dir / "initial_state").mkdir()
    (model_dir / "initial_state" / "short").write_bytes(b"\0" * 4)
    with pytest.raises(LoadFailed) as caught:
        sequence_batcher(source(model_dir), GRAPH_INPUTS, GRAPH_OUTPUTS)
    assert message in str(caught.value)
    assert str(tmp_path) not in str(caught.value)


def test_a_model_without_sequence_batching_has_no_batcher(tmp_path: Path) -> None:
    model_dir = examples.write_add_sub(tmp_path, "plain")
    assert sequence_batcher(source(model_dir), GRAPH_INPUTS, GRAPH_OUTPUTS) is None
    (model_dir / "config.pbtxt").write_text("max_batch_size: 4\n")
    assert sequence_batcher(source(model_dir), GRAPH_INPUTS, GRAPH_OUTPUTS) is None


# --- real sessions ---

async def test_accumulator_keeps_running_sums_per_sequence(runtime: OnnxRuntime, tmp_path: Path) -> None:
    model = await runtime.load(source(examples.write_accumulator(tmp_path, "acc")))
    assert isinstance(model, OnnxModel)
    assert [s.name for s in model.inputs] == ["INPUT"]  # controls and state are not the client's
    assert [s.name for s in model.outputs] == ["OUTPUT"]  # the config does not list STATE_OUT
    assert [await total(model, v, 11, start=v == 1) for v in (1, 2, 3)] == [1, 3, 6]
    assert await total(model, 100, 12, start=True) == 100
    assert await total(model, 4, 11) == 10
    assert await total(model, 5, 11, start=True) == 5  # START resets, in the graph and in the state fed
    assert await total(model, 1, 12, end=True) == 101
    with pytest.raises(InvalidInput, match=f"inference request for sequence 12 to model 'acc' {START_ERROR}"):
        await total(model, 1, 12)
    with pytest.raises(InvalidInput, match="unexpected inference output 'STATE_OUT' for model 'acc'"):
        await model.infer(sequence_request("acc", 1, 11, outputs=("STATE_OUT",)))


async def test_a_config_override_replaces_the_config_pbtxt_for_sequence_batching(runtime: OnnxRuntime,
                                                                                  tmp_path: Path) -> None:
    model_dir = examples.write_accumulator(tmp_path, "acc")
    config = model_dir / "config.pbtxt"
    override = json_format.MessageToJson(text_format.Parse(config.read_text(), model_config_pb2.ModelConfig()))
    config.write_text("max_batch_size: 4\n")  # the file alone: no sequence batching
    assert sequence_batcher(source(model_dir), GRAPH_INPUTS, GRAPH_OUTPUTS) is None
    model = await runtime.load(dataclasses.replace(source(model_dir), config_override=override))
    assert isinstance(model, OnnxModel) and model.sequences is not None
    assert [await total(model, v, 7, start=v == 1) for v in (1, 2, 3)] == [1, 3, 6]
    plain = dataclasses.replace(source(model_dir), config_override='{"max_batch_size": 4}')
    assert sequence_batcher(plain, GRAPH_INPUTS, GRAPH_OUTPUTS) is None

async def test_state_output_is_returned_when_the_config_lists_it(runtime: OnnxRuntime, tmp_path: Path) -> None:
    model_dir = examples.write_accumulator(tmp_path, "acc")
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text() + 'output [ { name: "STATE_OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]\n')
    model = await runtime.load(source(model_dir))
    assert [s.name for s in model.outputs] == ["OUTPUT", "STATE_OUT"]
    got = outputs_of(await model.infer(sequence_request("acc", 3, 1, start=True, outputs=("STATE_OUT",))))
    assert list(got) == ["STATE_OUT"] and int(got["STATE_OUT"][0, 0]) == 3
    got = outputs_of(await model.infer(sequence_request("acc", 4, 1)))
    assert {name: int(a[0, 0]) for name, a in got.items()} == {"OUTPUT": 7, "STATE_OUT": 7}


async def test_concurrent_requests_of_a_sequence_off_the_loop_keep_every_step(runtime: OnnxRuntime,
                                                                              tmp_path: Path) -> None:
    model = await runtime.load(source(examples.write_accumulator(tmp_path, "acc")))
    assert isinstance(model, OnnxModel) and not model.inline  # runs go to the thread pool until measured
    await total(model, 0, 5, start=True)
    sums = await asyncio.gather(*(total(model, 1, 5) for _ in range(20)))
    assert sorted(sums) == list(range(1, 21))  # each run saw the one before it, in some order


async def test_a_broken_sequence_config_fails_the_load(runtime: OnnxRuntime, tmp_path: Path) -> None:
    model_dir = examples.write_accumulator(tmp_path, "acc")
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text().replace('output_name: "STATE_OUT"', 'output_name: "MISSING"'))
    with pytest.raises(LoadFailed, match="failed to load model 'acc' version 1 .*state output 'MISSING' is not in"):
        await runtime.load(source(model_dir))


async def test_a_graph_with_a_bool_ready_control(runtime: OnnxRuntime, tmp_path: Path) -> None:
    """READY and END reach the graph as the tensors it declares: OUTPUT = READY and END, as INT32."""
    nodes = [helper.make_node("And", ["READY", "END"], ["both"]),
             helper.make_node("Cast", ["both"], ["cast"], to=TensorProto.INT32),
             helper.make_node("Add", ["cast", "INPUT"], ["OUTPUT"])]
    graph = helper.make_graph(nodes, "ctl", [
        helper.make_tensor_value_info("INPUT", TensorProto.INT32, [1, 1]),
        helper.make_tensor_value_info("READY", TensorProto.BOOL, [1, 1]),
        helper.make_tensor_value_info("END", TensorProto.BOOL, [1, 1])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.INT32, [1, 1])])
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", examples.OPSET)])
    onnx_model.ir_version = examples.IR_VERSION
    (tmp_path / "ctl" / "1").mkdir(parents=True)
    (tmp_path / "ctl" / "1" / "model.onnx").write_bytes(onnx_model.SerializeToString())
    (tmp_path / "ctl" / "config.pbtxt").write_text(
        "max_batch_size: 1\nsequence_batching { control_input [\n"
        '{ name: "READY" control [ { kind: CONTROL_SEQUENCE_READY bool_false_true: [ false, true ] } ] },\n'
        '{ name: "END" control [ { kind: CONTROL_SEQUENCE_END bool_false_true: [ false, true ] } ] } ] }\n')
    model = await runtime.load(source(tmp_path / "ctl"))
    assert await total(model, 10, 1, start=True) == 10
    assert await total(model, 10, 1, end=True) == 11
