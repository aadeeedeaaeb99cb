"""ModelConfig derived from a graph's tensors, under what a config.pbtxt says."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from meshnode.api.config import DEFAULT_MAX_BATCH_SIZE, data_type, derived, written_config
from meshnode.runtimes.base import TensorSpec
from meshnode.state.registry import ModelRecord

INPUTS = (TensorSpec("INPUT0", "FP32", (-1, 4)), TensorSpec("TEXT", "BYTES", (-1, 1)))
OUTPUTS = (TensorSpec("OUTPUT0", "INT64", (-1, 2)),)


def _written(text: str = "") -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_kserve_datatypes_map_to_model_config_types() -> None:
    assert data_type("FP32") == model_config_pb2.TYPE_FP32
    assert data_type("BYTES") == model_config_pb2.TYPE_STRING
    assert data_type("BOOL") == model_config_pb2.TYPE_BOOL


def test_a_batching_graph_gets_triton_s_default_batch_bound_and_dims_without_it() -> None:
    config = derived("m", "onnxruntime_onnx", INPUTS, OUTPUTS, _written())
    assert (config.name, config.platform, config.max_batch_size) == ("m", "onnxruntime_onnx", DEFAULT_MAX_BATCH_SIZE)
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("INPUT0", model_config_pb2.TYPE_FP32, [4]), ("TEXT", model_config_pb2.TYPE_STRING, [1])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("OUTPUT0", model_config_pb2.TYPE_INT64,
                                                                              [2])]


def test_a_graph_with_fixed_first_dimensions_does_not_batch() -> None:
    config = derived("m", "onnxruntime_onnx", (TensorSpec("x", "FP32", (3, 4)),), (), _written())
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [3, 4]


def test_the_written_config_wins_and_the_graph_fills_in_the_rest() -> None:
    written = _written('name: "m" backend: "onnxruntime" version_policy { all {} } '
                       'output [ { name: "OUTPUT0" data_type: TYPE_INT64 dims: [ -1, 2 ] } ]')
    config = derived("m", "onnxruntime_onnx", INPUTS, OUTPUTS, written)
    assert config.backend == "onnxruntime" and not config.platform  # a backend named is not overridden
    assert config.version_policy.HasField("all")
    # The file lists outputs, so it decides batching (none said: 0) and its outputs stay as written.
    assert config.max_batch_size == 0 and list(config.output[0].dims) == [-1, 2]
    assert [list(t.dims) for t in config.input] == [[-1, 4], [-1, 1]]


def test_a_max_batch_size_written_without_tensors_stays_when_the_graph_batches() -> None:
    assert derived("m", "onnxruntime_onnx", INPUTS, OUTPUTS, _written("max_batch_size: 16")).max_batch_size == 16
    fixed = (TensorSpec("x", "FP32", (3, 4)),)
    assert derived("m", "onnxruntime_onnx", fixed, (), _written("max_batch_size: 16")).max_batch_size == 0


def test_the_written_config_is_the_override_when_a_load_gave_one(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "config.pbtxt").write_text('max_batch_size: 8 input [ { name: "INPUT0" data_type: TYPE_FP32 '
                                           'dims: [ 4 ] } ]')
    record = ModelRecord(name="m", storage=str(tmp_path))
    assert written_config(record).max_batch_size == 8
    overridden = written_config(ModelRecord(name="m", storage=str(tmp_path), config_override='{"maxBatchSize": "16"}'))
    assert overridden.max_batch_size == 16 and not overridden.input
    config = derived("m", "onnxruntime_onnx", INPUTS, OUTPUTS, overridden)
    assert config.max_batch_size == 16 and [list(t.dims) for t in config.input] == [[4], [1]]
    single = tmp_path / "model.onnx"
    single.write_bytes(b"x")
    assert written_config(ModelRecord(name="s", storage=str(single))).max_batch_size == 0
    assert written_config(ModelRecord(name="s", storage=str(single), config_override='{"max_batch_size": 2}')
                          ).max_batch_size == 2
