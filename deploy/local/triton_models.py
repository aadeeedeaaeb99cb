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

_ONNX_MLP_PY = '''\
import os

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            (y,) = self.session.run(["OUTPUT0"], {"INPUT0": x})
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", y)]))
        return responses
'''


def _tensors(kind: str, names: tuple[str, ...], width: int) -> str:
    items = ", ".join(f'{{ name: "{n}" data_type: TYPE_FP32 dims: [ -1, {width} ] }}' for n in names)
    return f"{kind} [ {items} ]\n"


def _write(directory: Path | str, name: str, version: int, config: str, code: str) -> Path:
    model_dir = Path(directory) / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n{config}'
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
    return _write(directory, name, version, config, _ONNX_MLP_PY)
