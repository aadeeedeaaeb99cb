"""The node speaks Triton's gRPC protocol to an unmodified tritonclient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from deploy.local.models import mlp_reference
from tests.integration.conftest import DATATYPES


def infer_mlp(client: grpcclient.InferenceServerClient, x: np.ndarray, version: str = "") -> np.ndarray:
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("mlp", [inp], model_version=version)
    return result.as_numpy("OUTPUT0")


def test_server_is_live_ready_and_describes_itself(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "meshserve"
    assert "model_repository" in meta["extensions"]


def test_mlp_answers_match_numpy_for_latest_and_pinned_versions(
    client: grpcclient.InferenceServerClient, model_repo: Path
) -> None:
    x = np.random.default_rng(0).standard_normal((3, 16), dtype=np.float32)
    expected = mlp_reference(model_repo / "mlp", x, version=2)
    np.testing.assert_allclose(infer_mlp(client, x), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(infer_mlp(client, x, "1"), mlp_reference(model_repo / "mlp", x, version=1),
                               rtol=1e-4, atol=1e-5)
    meta = client.get_model_metadata("mlp", as_json=True)
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": ["-1", "16"]}]


def test_only_the_versions_the_policy_serves_answer_and_the_newest_of_them_by_default(
    client: grpcclient.InferenceServerClient,
) -> None:
    # Version N of 'picked' takes tensors of width N: the answer's shape says which version ran.
    def run(version: str) -> tuple[int, ...]:
        width = int(version or "3")
        inputs = [grpcclient.InferInput(f"INPUT{i}", [1, width], "FP32") for i in (0, 1)]
        for tensor in inputs:
            tensor.set_data_from_numpy(np.ones((1, width), np.float32))
        answer = client.infer("picked", inputs, model_version=version)
        assert answer.get_response().model_version == (version or "3")
        return tuple(answer.as_numpy("OUTPUT0").shape)

    assert run("") == (1, 3) and run("1") == (1, 1) and run("3") == (1, 3)
    with pytest.raises(InferenceServerException) as err:
        run("2")  # on disk, but not served by the policy
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "'picked' version 2 is not found" in (err.value.message() or "")
    assert client.get_model_metadata("picked", as_json=True)["versions"] == ["1", "3"]
    assert not client.is_model_ready("picked", "2") and client.is_model_ready("picked", "1")


def test_unknown_version_is_not_found(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as err:
        infer_mlp(client, np.zeros((1, 16), np.float32), "7")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_requested_outputs_are_honoured(client: grpcclient.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.ones((1, 16), np.float32)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("simple", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None
    both = client.infer("simple", inputs)
    np.testing.assert_array_equal(both.as_numpy("OUTPUT0"), a + b)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips(client: grpcclient.InferenceServerClient, datatype: str) -> None:
    rng = np.random.default_rng(1)
    if datatype == "BYTES":
        data = np.array([[f"word-{i}-é".encode() for i in range(16)]] * 2, dtype=np.object_)
    elif datatype == "BOOL":
        data = rng.integers(0, 2, (2, 16)).astype(bool)
    else:
        dtype = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.get(datatype)
        data = (rng.standard_normal((2, 16)).astype(dtype) if dtype is not None
                else rng.integers(0, 100, (2, 16)).astype(np.dtype(datatype.lower())))
    assert np_to_triton_dtype(data.dtype) == datatype
    inp = grpcclient.InferInput("INPUT0", list(data.shape), datatype)
    inp.set_data_from_numpy(data)
    out = client.infer(f"id_{datatype.lower()}", [inp]).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, data)


def test_stream_infer_answers_each_request_and_reports_errors_inline(
    client: grpcclient.InferenceServerClient,
) -> None:
    results: list[tuple[object, object]] = []
    client.start_stream(callback=lambda result, error: results.append((result, error)))
    x = np.ones((1, 16), np.float32)
    inp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    client.async_stream_infer("mlp", [inp])
    client.async_stream_infer("no_such_model", [inp])
    client.async_stream_infer("mlp", [inp])
    client.stop_stream()
    # Responses come as they are produced (as from Triton): the unknown model's error may overtake a load.
    assert len(results) == 3
    errors = [error for _, error in results if error is not None]
    assert len(errors) == 1 and "no_such_model" in str(errors[0])
