"""KServe v2 JSON and Triton's binary extension to and from protobuf."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as triton_pb

from meshnode.api.http.codec import infer_request, infer_response, message_json, parameter_values
from meshnode.errors import InvalidInput
from meshpb import pb


def _body(document: dict[str, object], binary: bytes = b"") -> tuple[bytes, str | None]:
    header = json.dumps(document).encode()
    return header + binary, str(len(header)) if binary else None


def test_json_inputs_become_raw_contents_and_outputs_requested() -> None:
    body, length = _body({"id": "a", "parameters": {"priority": 2, "binary_data_output": True, "flag": False},
                          "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]},
                                     {"name": "s", "shape": [2], "datatype": "BYTES", "data": ["ab", ""]}],
                          "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}]})
    request, binary_all, binary_names = infer_request("m", "3", body, length)
    assert (request.model_name, request.model_version, request.id) == ("m", "3", "a")
    assert request.parameters["priority"].int64_param == 2 and request.parameters["flag"].HasField("bool_param")
    assert "binary_data_output" not in request.parameters  # how tensors travel here means nothing to the core
    assert np.frombuffer(request.raw_input_contents[0], "<f4").tolist() == [1, 2, 3, 4]
    assert request.raw_input_contents[1] == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    assert [o.name for o in request.outputs] == ["y", "z"]
    assert binary_all and binary_names == {"y"}


def test_binary_inputs_take_their_share_of_the_body_in_order() -> None:
    first, second = struct.pack("<2i", 7, 8), struct.pack("<f", 1.5)
    body, length = _body({"inputs": [
        {"name": "a", "shape": [2], "datatype": "INT32", "parameters": {"binary_data_size": 8}},
        {"name": "b", "shape": [1], "datatype": "FP32", "data": [3]},
        {"name": "c", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}, first + second)
    request, _, _ = infer_request("m", "", body, length)
    assert list(request.raw_input_contents) == [first, struct.pack("<f", 3), second]


@pytest.mark.parametrize(("document", "binary", "length", "message"), [
    ({"inputs": []}, b"", None, "needs `inputs`"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}, b"", None, "1 values for shape [2]"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}, b"", None, "is not FP32"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BF16", "data": [1]}]}, b"", None, "'BF16'"),
    ({"inputs": [{"name": "x", "shape": ["1"], "datatype": "FP32", "data": [1]}]}, b"", None, "`shape` (integers)"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}, b"", None, "neither `data`"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]},
     b"1234", "", "binary_data_size 8"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}, b"1234", "", "past what"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}, b"", "99", "is 99"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}, b"", "ten", "number of bytes"),
    ({"parameters": {"p": 1.5}, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}, b"",
     None, "parameter 'p'"),
])
def test_bad_requests_are_invalid_input_naming_the_problem(document: dict[str, object], binary: bytes,
                                                            length: str | None, message: str) -> None:
    body, computed = _body(document, binary)
    with pytest.raises(InvalidInput) as raised:
        infer_request("m", "", body, computed if length == "" else length)
    assert message in str(raised.value)


def test_malformed_json_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="malformed JSON"):
        infer_request("m", "", b"{oops", None)


def _response() -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="m", model_version="1", id="q")
    response.outputs.add(name="y", datatype="FP32", shape=[2])
    response.raw_output_contents.append(struct.pack("<2f", 1.5, 2.5))
    response.outputs.add(name="s", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(struct.pack("<I", 2) + b"hi")
    response.parameters["sequence"].bool_param = True
    return response


def test_outputs_answer_in_json_unless_asked_in_binary() -> None:
    body, length = infer_response(_response(), False, set())
    assert length == len(body)
    document = json.loads(body)
    assert document == {"model_name": "m", "model_version": "1", "id": "q", "parameters": {"sequence": True},
                        "outputs": [{"name": "y", "datatype": "FP32", "shape": [2], "data": [1.5, 2.5]},
                                    {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}
    body, length = infer_response(_response(), False, {"y"})
    assert json.loads(body[:length])["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [2],
                                                       "parameters": {"binary_data_size": 8}}
    assert body[length:] == struct.pack("<2f", 1.5, 2.5)
    body, length = infer_response(_response(), True, set())
    assert body[length:] == struct.pack("<2f", 1.5, 2.5) + struct.pack("<I", 2) + b"hi"


def test_typed_contents_are_answered_too() -> None:
    response = pb.ModelInferResponse(model_name="m")
    output = response.outputs.add(name="y", datatype="INT64", shape=[2])
    output.contents.int64_contents.extend([3, 4])
    body, _ = infer_response(response, False, set())
    assert json.loads(body)["outputs"][0]["data"] == [3, 4]


def test_messages_as_json_keep_numbers_and_enum_names_and_optionally_defaults() -> None:
    stats = triton_pb.ModelStatistics(name="m", inference_count=2**40)
    assert message_json(stats) == {"name": "m", "inference_count": 2**40}
    whole = message_json(stats, defaults=True)
    assert whole["inference_stats"]["fail"] == {"count": 0, "ns": 0} and whole["version"] == ""
    metadata = pb.ModelMetadataResponse(name="m", inputs=[pb.ModelMetadataResponse.TensorMetadata(
        name="x", datatype="FP32", shape=[-1, 4])])
    assert message_json(metadata) == {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]}
    assert parameter_values({"a": pb.InferParameter(int64_param=3)}) == {"a": 3}
