"""meshnode.runtimes.tensors turns malformed inputs into InvalidInput (or Unsupported) naming the input and model."""

from __future__ import annotations

import numpy as np
import pytest

from meshnode.errors import InvalidInput, Unsupported
from meshnode.runtimes import tensors
from meshnode.runtimes.base import TensorSpec
from meshnode.runtimes.tensors import (
    decode_inputs,
)
from meshpb import pb
from tests.unit.meshnode.runtimes.tensor_cases import (
    MODEL,
    FP32_1x16,
    client_request,
    names_the_model,
    raw_bytes_tensor,
    sample,
    spec,
    typed_request,
)

# ---- decode: every rejection names the input and the model ----------------------------------------


def rejects(request: pb.ModelInferRequest, specs: list[TensorSpec], *fragments: str) -> str:
    with pytest.raises(InvalidInput) as caught:
        decode_inputs(request, specs, MODEL)
    message = str(caught.value)
    assert names_the_model(message), message
    for fragment in fragments:
        assert fragment in message
    return message




def test_exact_triton_messages() -> None:
    good = [spec()]
    assert (
        rejects(client_request({"INPUT0": sample("INT32", (1, 16))}), good)
        == "inference input 'INPUT0' data-type is 'INT32', but model 'm' expects 'FP32'"
    )
    assert (
        rejects(client_request({"INPUT0": sample("FP32", (1, 15))}), good)
        == "unexpected shape for input 'INPUT0' for model 'm'. Expected [-1,16], got [1,15]"
    )
    request = client_request({"INPUT0": FP32_1x16})
    request.raw_input_contents[0] = request.raw_input_contents[0][:60]
    assert rejects(request, good) == "input byte size mismatch for input 'INPUT0' for model 'm'. Expected 64, got 60"
    assert rejects(client_request({"X": FP32_1x16}), good) == "unexpected inference input 'X' for model 'm'"
    message = rejects(client_request({"INPUT0": FP32_1x16}), [spec(), spec(name="INPUT1")], "'INPUT1'")
    assert message.startswith("expected 2 inputs but got 1 inputs for model 'm'")


def test_contents_beside_raw_contents_is_refused_in_tritons_words_whatever_the_count() -> None:
    two = [spec(), spec(name="INPUT1")]
    request = client_request({"INPUT0": FP32_1x16, "INPUT1": FP32_1x16})
    del request.raw_input_contents[1]  # as Triton's example sends it: one raw entry, the other input as contents
    request.inputs[0].contents.fp32_contents[:] = [1.0] * 16
    expected = "contents field must not be specified when using raw_input_contents for 'INPUT0' for model 'm'"
    assert rejects(request, two) == expected
    request.raw_input_contents.append(request.raw_input_contents[0])
    assert rejects(request, two) == expected


def test_extra_input() -> None:
    rejects(client_request({"INPUT0": FP32_1x16, "EXTRA": FP32_1x16}), [spec()], "'EXTRA'")


def test_duplicate_input() -> None:
    request = client_request({"INPUT0": FP32_1x16})
    request.inputs.append(request.inputs[0])
    request.raw_input_contents.append(request.raw_input_contents[0])
    rejects(request, [spec(), spec(name="INPUT1")], "'INPUT0'", "more than once")


def test_batch_sizes_must_agree_when_every_input_takes_a_batch() -> None:
    specs = [spec(), spec(name="INPUT1")]
    request = client_request({"INPUT0": sample("FP32", (0, 16)), "INPUT1": sample("FP32", (2, 16))})
    assert rejects(request, specs) == "input 'INPUT1' batch size does not match other inputs for 'm'"
    # An input whose first dimension is fixed: the model takes no batch, and other first dimensions are free.
    free = [spec(), spec(name="INPUT1", shape=(-1, 16)), spec(name="INPUT2", shape=(3,))]
    decode_inputs(client_request({"INPUT0": sample("FP32", (1, 16)), "INPUT1": sample("FP32", (2, 16)),
                                  "INPUT2": sample("FP32", (3,))}), free, MODEL)


def test_rank_mismatch() -> None:
    rejects(client_request({"INPUT0": sample("FP32", (16,))}), [spec()], "'INPUT0'", "Expected [-1,16], got [16]")


@pytest.mark.parametrize("shape", [[-1, 16], [1, -16], [-2, -8]])
def test_negative_dims(shape: list[int]) -> None:
    request = client_request({"INPUT0": FP32_1x16})
    request.inputs[0].shape[:] = shape
    rejects(request, [spec()], "'INPUT0'", "negative")


@pytest.mark.parametrize(
    "shape", [[2**31, 1], [2**40, 2**40], [2**62, 2**62], [0, 2**62], [2**63 - 1, 0], [65536, 65536]]
)
def test_absurd_shapes_rejected_without_allocating(shape: list[int]) -> None:
    request = client_request({"INPUT0": sample("FP32", (1, 1))})
    request.inputs[0].shape[:] = shape
    rejects(request, [spec("FP32", (-1, -1))], "'INPUT0'")
    bytes_request = client_request({"INPUT0": sample("BYTES", (1, 1))})
    bytes_request.inputs[0].shape[:] = shape
    rejects(bytes_request, [spec("BYTES", (-1, -1))], "'INPUT0'")


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [2**40, 0, 2**40], [2**31 + 1, 0, 1]])
@pytest.mark.parametrize("datatype", ["FP32", "BYTES", "BOOL"])
@pytest.mark.parametrize("typed", [False, True])
def test_empty_tensor_with_absurd_dims(shape: list[int], datatype: str, typed: bool) -> None:
    """Zero elements and matching (empty) data, yet numpy could not even describe the array."""
    empty = sample(datatype, (0, 1, 1))
    request = typed_request("INPUT0", datatype, empty) if typed else client_request({"INPUT0": empty})
    request.inputs[0].shape[:] = shape
    rejects(request, [spec(datatype, (-1, -1, -1))], "'INPUT0'", "elements")


def test_raw_count_must_match_inputs() -> None:
    request = client_request({"INPUT0": FP32_1x16, "INPUT1": FP32_1x16})
    del request.raw_input_contents[1]
    rejects(request, [spec(), spec(name="INPUT1")], "'INPUT0'", "'INPUT1'")
    request = client_request({"INPUT0": FP32_1x16})
    request.raw_input_contents.append(b"")
    rejects(request, [spec()], "'INPUT0'")


def test_raw_and_contents_together() -> None:
    request = client_request({"INPUT0": FP32_1x16})
    request.inputs[0].contents.fp32_contents.extend([0.0] * 16)
    rejects(request, [spec()], "'INPUT0'", "contents")


def test_missing_data() -> None:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    rejects(request, [spec()], "'INPUT0'", "Expected 16, got 0")


def test_shared_memory_is_unsupported() -> None:
    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    tensor.parameters["shared_memory_region"].string_param = "region"
    with pytest.raises(Unsupported, match="'INPUT0'"):
        decode_inputs(request, [spec()], MODEL)


def test_typed_count_mismatch() -> None:
    request = typed_request("INPUT0", "FP32", sample("FP32", (1, 15)))
    request.inputs[0].shape[:] = [1, 16]
    rejects(request, [spec()], "'INPUT0'", "Expected 16, got 15")


@pytest.mark.parametrize(
    ("datatype", "field"),
    [("INT32", "fp32_contents"), ("INT64", "int_contents"), ("UINT8", "int_contents"), ("FP64", "fp32_contents")]
    + [("BOOL", "uint_contents"), ("BYTES", "int64_contents"), ("UINT64", "int64_contents")],
)
def test_typed_field_must_match_datatype(datatype: str, field: str) -> None:
    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=[2])
    getattr(tensor.contents, field).extend([1, 0] if field != "bytes_contents" else [b"a", b"b"])
    rejects(request, [spec(datatype, (2,))], "'INPUT0'", field)


def test_two_typed_fields() -> None:
    request = typed_request("INPUT0", "INT32", sample("INT32", (2,)))
    request.inputs[0].contents.fp32_contents.extend([1.0, 2.0])
    rejects(request, [spec("INT32", (2,))], "'INPUT0'")


def test_fp16_only_travels_raw() -> None:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="INPUT0", datatype="FP16", shape=[2]).contents.fp32_contents.extend([1.0, 2.0])
    rejects(request, [spec("FP16", (2,))], "'INPUT0'", "raw")


@pytest.mark.parametrize(
    ("datatype", "values"),
    [("INT8", [128]), ("INT8", [-129]), ("INT16", [40000]), ("UINT8", [256]), ("UINT16", [70000])],
)
def test_typed_values_out_of_range(datatype: str, values: list[int]) -> None:
    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=[1])
    getattr(tensor.contents, tensors._CONTENTS_FIELD[datatype]).extend(values)
    rejects(request, [spec(datatype, (1,))], "'INPUT0'", "range")


def test_bool_raw_bytes_must_be_0_or_1() -> None:
    request = client_request({"INPUT0": np.array([True, False])})
    request.raw_input_contents[0] = b"\x01\x02"
    rejects(request, [spec("BOOL", (2,))], "'INPUT0'", "BOOL")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(raw_bytes_tensor(b"a"), id="one-of-two"),
        pytest.param(raw_bytes_tensor(b"a", b"b", b"c"), id="three-of-two"),
        pytest.param(raw_bytes_tensor(b"a", b"b") + b"\x00", id="trailing"),
        pytest.param(raw_bytes_tensor(b"a") + b"\x05\x00\x00\x00ab", id="overrun"),
        pytest.param(raw_bytes_tensor(b"a") + b"\x01\x00", id="short-length"),
        pytest.param(b"\xff\xff\xff\xff" + b"\x00" * 8, id="huge-length"),
        pytest.param(raw_bytes_tensor(b"a", b"\xff\xfe"), id="not-utf8"),
        pytest.param(raw_bytes_tensor(b"\xed\xa0\x80", b"b"), id="surrogate"),
    ],
)
def test_malformed_raw_bytes(raw: bytes) -> None:
    request = client_request({"INPUT0": sample("BYTES", (2,))})
    request.raw_input_contents[0] = raw
    rejects(request, [spec("BYTES", (2,))], "'INPUT0'")


def test_typed_bytes_must_be_utf8() -> None:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"\xc3")
    rejects(request, [spec("BYTES", (1,))], "'INPUT0'", "UTF-8")


def test_spec_datatype_unknown_to_us_is_unsupported() -> None:
    request = client_request({"INPUT0": sample("UINT16", (2,))}, {"INPUT0": "UINT16"})
    request.inputs[0].datatype = "BF16"
    with pytest.raises(Unsupported, match="'INPUT0'"):
        decode_inputs(request, [spec("BF16", (2,))], MODEL)


def test_error_messages_do_not_echo_unbounded_client_data() -> None:
    request = client_request({"INPUT0": FP32_1x16})
    request.inputs[0].shape[:] = [1] * 100_000
    message = rejects(request, [spec()], "'INPUT0'")
    assert len(message) < 500


