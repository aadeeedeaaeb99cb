"""Example Triton Python-backend models (DIR/NAME/config.pbtxt + VERSION/model.py) for tests and the bench.

The Triton that `make triton` installs has only the Python backend, so these are how tests put models
of a backend other than the node's own ONNX Runtime into the mesh. The model code runs in Triton's venv
(numpy 1.26, onnxruntime), never in the node's.
"""

from __future__ import annotations

from pathlib import Path

from deploy.local.models import write_mlp

_ADD_SUB_PY = '''\
import time

import triton_python_backend_utils as pb_utils

DELAY_S = {delay_s!r}


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(DELAY_S)
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            outputs = [pb_utils.Tensor("OUTPUT0", a + b), pb_utils.Tensor("OUTPUT1", a - b)]
            responses.append(pb_utils.InferenceResponse(outputs))
        return responses
'''

# A Python-backend model that runs the ONNX graph beside it in Triton's own onnxruntime: every input the request
# carries (Triton's control inputs included) by name, every output of the graph. So one graph per example model
# serves both runtimes. as_python_backend renames the graph so that Triton, completing a config without a backend
# (a load with an override config), finds only model.py and picks the Python backend.
GRAPH_FILE = "graph.onnx"
_ONNX_GRAPH_PY = '''\
import os

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "{graph}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.outputs = [output.name for output in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
            arrays = self.session.run(self.outputs, feeds)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, array) for name, array in zip(self.outputs, arrays)]))
        return responses
'''


def _tensors(kind: str, names: tuple[str, ...], width: int) -> str:
    items = ", ".join(f'{{ name: "{n}" data_type: TYPE_FP32 dims: [ -1, {width} ] }}' for n in names)
    return f"{kind} [ {items} ]\n"


def _write(directory: Path | str, name: str, version: int, config: str, code: str, max_batch_size: int = 0) -> Path:
    model_dir = Path(directory) / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n{config}'
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
    )
    (model_dir / str(version) / "model.py").write_text(code)
    return model_dir


def write_python_add_sub(directory: Path | str, name: str, version: int = 1, *, width: int = 16,
                         delay_s: float = 0.0) -> Path:
    """Triton's "simple" in numpy: INPUT0, INPUT1 FP32 [-1, width] -> OUTPUT0 = sum, OUTPUT1 = difference.

    delay_s: each batch first sleeps this long (a slow model, for deadline tests).
    """
    config = _tensors("input", ("INPUT0", "INPUT1"), width) + _tensors("output", ("OUTPUT0", "OUTPUT1"), width)
    return _write(directory, name, version, config, _ADD_SUB_PY.format(delay_s=delay_s))


def write_python_onnx_mlp(
    directory: Path | str, name: str, version: int = 1, *, in_features: int = 16, out_features: int = 4,
    approx_bytes: int = 1_000_000, seed: int = 0,
) -> Path:
    """meshnode.examples.write_mlp's MLP run by ONNX Runtime inside a Python-backend model.

    Same weights for the same seed, so meshnode.examples.mlp_reference gives its answers.
    """
    write_mlp(directory, name, version, in_features=in_features, out_features=out_features,
              approx_bytes=approx_bytes, seed=seed)
    config = _tensors("input", ("INPUT0",), in_features) + _tensors("output", ("OUTPUT0",), out_features)
    return _write(directory, name, version, config, _ONNX_GRAPH_PY.replace("{graph}", "model.onnx"))


def as_python_backend(model_dir: Path) -> Path:
    """A numeric model of deploy.local.models whose config.pbtxt is complete, made a Python-backend model that
    runs its graph."""
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text().replace('platform: "onnxruntime_onnx"', 'backend: "python"'))
    for version in model_dir.iterdir():
        if version.name.isdigit():
            (version / "model.onnx").rename(version / GRAPH_FILE)
            (version / "model.py").write_text(_ONNX_GRAPH_PY.replace("{graph}", GRAPH_FILE))
    return model_dir


_REPEAT_PY = '''\
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

CANCELLED_MARKER = {marker!r}


class TritonPythonModel:
    """Triton's repeat_int32: one response per element of IN (OUT = IN[i], IDX = i) after DELAY[i] ms, then the
    final flag; WAIT ms before the first. Each request runs in its own thread, so one stream's requests overlap."""

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._repeat, args=(request,), daemon=True).start()
        return None

    def _repeat(self, request):
        sender = request.get_response_sender()
        values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
        delays = pb_utils.get_input_tensor_by_name(request, "DELAY").as_numpy()
        wait = pb_utils.get_input_tensor_by_name(request, "WAIT").as_numpy()
        cancelled = _pause(sender, int(wait[0]))
        for index, value in enumerate(values):
            cancelled = cancelled or _pause(sender, int(delays[index]))
            if cancelled:
                if CANCELLED_MARKER:
                    with open(CANCELLED_MARKER, "a") as marker:
                        marker.write(f"{{index}}\\n")
                break
            sender.send(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUT", np.array([value], np.int32)),
                pb_utils.Tensor("IDX", np.array([index], np.uint32))]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _pause(sender, ms):
    """Sleeps `ms`, looking for a cancellation every 20 ms; True when the request was cancelled."""
    end = time.monotonic() + ms / 1000.0
    while not sender.is_cancelled():
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(left, 0.02))
    return True
'''


def write_python_repeat(directory: Path | str, name: str = "repeat_int32", version: int = 1, *,
                        cancelled_marker: Path | str = "") -> Path:
    """A decoupled model as Triton's repeat_int32 example: IN INT32 [-1], DELAY UINT32 [-1], WAIT UINT32 [1] ->
    OUT INT32 [1], IDX UINT32 [1], one response per element of IN, zero for an empty IN.

    cancelled_marker: a file the model appends the index it stopped at to, when a request is cancelled.
    """
    config = (
        'model_transaction_policy { decoupled: true }\n'
        'input [ { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] }, { name: "DELAY" data_type: TYPE_UINT32 '
        'dims: [ -1 ] }, { name: "WAIT" data_type: TYPE_UINT32 dims: [ 1 ] } ]\n'
        'output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }, { name: "IDX" data_type: TYPE_UINT32 '
        'dims: [ 1 ] } ]\n'
    )
    return _write(directory, name, version, config, _REPEAT_PY.format(marker=str(cancelled_marker)))


_ACCUMULATE_PY = '''\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Triton's simple_sequence: OUTPUT is the sum of the sequence's INPUTs so far; a start begins a new sum."""

    def initialize(self, args):
        self.sums = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            value = int(pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy().flatten()[0])
            start = int(pb_utils.get_input_tensor_by_name(request, "START").as_numpy().flatten()[0])
            corrid = int(pb_utils.get_input_tensor_by_name(request, "CORRID").as_numpy().flatten()[0])
            self.sums[corrid] = value if start else self.sums.get(corrid, 0) + value
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT", np.array([[self.sums[corrid]]], np.int32))]))
        return responses
'''


def write_python_sequence(directory: Path | str, name: str = "simple_sequence", version: int = 1, *,
                          idle_us: int = 5_000_000) -> Path:
    """A stateful model as Triton's simple_sequence: INPUT INT32 [-1, 1] -> OUTPUT INT32 [-1, 1] (max_batch_size 8:
    eight sequences at once per copy), the running sum of the sequence's inputs (sequence batching, its state in
    the copy), idle sequences released after `idle_us`."""
    config = (
        f"sequence_batching {{ max_sequence_idle_microseconds: {idle_us}\n"
        '  control_input [ { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },\n'
        '    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] } ] }\n'
        'input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
        'output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
    )
    return _write(directory, name, version, config, _ACCUMULATE_PY, max_batch_size=8)
