"""Triton's example models (deploy.local.models.write_simple*) answer as Triton's example clients expect, and
their config.pbtxt parses as Triton's model config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from deploy.local.models import write_simple, write_simple_sequence, write_simple_string


def _run(model_dir: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _config(model_dir: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize(("name", "datatype", "dtype"),
                         [("simple", "INT32", np.int32), ("simple_int8", "INT8", np.int8)])
def test_simple_adds_and_subtracts_in_its_datatype(tmp_path: Path, name: str, datatype: str, dtype: type) -> None:
    model_dir = write_simple(tmp_path, name, datatype)
    a: np.ndarray = np.arange(16, dtype=dtype)[None].repeat(2, axis=0)  # a batch of two
    b: np.ndarray = np.ones((2, 16), dtype)
    out = _run(model_dir, {"INPUT0": a, "INPUT1": b})
    assert out["OUTPUT0"].dtype == dtype and np.array_equal(out["OUTPUT0"], a + b)
    assert np.array_equal(out["OUTPUT1"], a - b)
    config = _config(model_dir)
    assert config.name == name and config.max_batch_size == 8
    assert [(t.name, list(t.dims)) for t in config.input] == [("INPUT0", [16]), ("INPUT1", [16])]
    assert model_config_pb2.DataType.Name(config.output[0].data_type) == f"TYPE_{datatype}"


def test_simple_string_answers_decimal_strings(tmp_path: Path) -> None:
    model_dir = write_simple_string(tmp_path)
    a = np.array([[str(i) for i in range(16)]], dtype=object)
    b = np.array([["1"] * 16], dtype=object)
    out = _run(model_dir, {"INPUT0": a, "INPUT1": b})
    assert [int(x) for x in out["OUTPUT0"][0]] == [i + 1 for i in range(16)]
    assert [int(x) for x in out["OUTPUT1"][0]] == [i - 1 for i in range(16)]
    assert model_config_pb2.DataType.Name(_config(model_dir).input[0].data_type) == "TYPE_STRING"


def test_simple_sequence_adds_start_and_answers_zero_when_not_ready(tmp_path: Path) -> None:
    model_dir = write_simple_sequence(tmp_path, idle_us=7)

    def output(value: int, start: int, ready: int) -> int:
        feeds = {n: np.array([[v]], np.int32) for n, v in (("INPUT", value), ("START", start), ("READY", ready))}
        return int(_run(model_dir, feeds)["OUTPUT"][0][0])

    assert (output(20, 1, 1), output(-11, 0, 1), output(5, 1, 0)) == (21, -11, 0)
    batching = _config(model_dir).sequence_batching
    assert batching.max_sequence_idle_microseconds == 7
    assert [c.name for c in batching.control_input] == ["START", "READY"]
