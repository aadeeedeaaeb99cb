"""meshnode.runtimes.tensors against the real client: requests are built by tritonclient and responses are read
back through tritonclient's InferResult, so a wire-format disagreement with Triton clients fails here."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.utils import deserialize_bytes_tensor

from meshnode.errors import InvalidInput, Unsupported
from meshnode.runtimes.base import TensorSpec
from meshnode.runtimes.tensors import (
    DATATYPE_TO_NUMPY,
    datatype_of_numpy,
    datatype_of_onnx,
    decode_inputs,
    encode_response,
    index_specs,
    requested_outputs,
)
from meshpb import pb
from tests.unit.meshnode.runtimes.tensor_cases import (
    DATATYPES,
    MODEL,
    TYPED_DATATYPES,
    FP32_1x16,
    assert_same,
    client_request,
    client_result,
    names_the_model,
    sample,
    spec,
    to_pb,
    typed_request,
)

# ---- datatype tables ------------------------------------------------------------------------------


def test_datatype_table_matches_tritonclient() -> None:
    from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

    assert sorted(DATATYPES) == sorted(
        ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
        + ["FP16", "FP32", "FP64", "BYTES"]
    )
    for datatype, dtype in DATATYPE_TO_NUMPY.items():
        assert np.dtype(triton_to_np_dtype(datatype)) == dtype
        assert np_to_triton_dtype(dtype) == datatype
        assert datatype_of_numpy(dtype) == datatype


@pytest.mark.parametrize("dtype", [np.dtype("U5"), np.dtype("S3"), np.dtype(object)])
def test_string_dtypes_are_bytes(dtype: np.dtype) -> None:
    assert datatype_of_numpy(dtype) == "BYTES"


def test_big_endian_dtypes_map_by_kind() -> None:
    assert datatype_of_numpy(np.dtype(">f4")) == "FP32"
    assert datatype_of_numpy(np.dtype(">u2")) == "UINT16"


@pytest.mark.parametrize("dtype", [np.dtype("c8"), np.dtype("M8[s]"), np.dtype("V4")])
def test_unknown_numpy_dtype_is_unsupported(dtype: np.dtype) -> None:
    with pytest.raises(Unsupported):
        datatype_of_numpy(dtype)


def identity_session(datatype: str) -> ort.InferenceSession:
    renamed = {"FP16": "FLOAT16", "FP32": "FLOAT", "FP64": "DOUBLE", "BYTES": "STRING"}
    elem = getattr(TensorProto, renamed.get(datatype, datatype))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "identity",
        [helper.make_tensor_value_info("INPUT0", elem, ["n", 3])],
        [helper.make_tensor_value_info("OUTPUT0", elem, ["n", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("datatype", DATATYPES)
def test_onnxruntime_round_trip(datatype: str) -> None:
    """ORT's own type strings map back to the datatype, and ORT accepts what decode_inputs produces."""
    session = identity_session(datatype)
    ort_input = session.get_inputs()[0]
    assert datatype_of_onnx(ort_input.type) == datatype
    arr = sample(datatype, (2, 3), seed=1)
    decoded = decode_inputs(client_request({"INPUT0": arr}), [spec(datatype, (-1, 3))], MODEL)
    (result,) = session.run(["OUTPUT0"], decoded)
    response = encode_response(client_request({"INPUT0": arr}), MODEL, "1", ["OUTPUT0"], [result])
    want = arr
    if datatype == "BYTES":  # tritonclient reads BYTES back as bytes
        want = np.array([s.encode() for s in arr.reshape(-1)], dtype=object).reshape(arr.shape)
    assert_same(client_result(response).as_numpy("OUTPUT0"), want)


@pytest.mark.parametrize("onnx_type", ["tensor(bfloat16)", "tensor(complex64)", "seq(tensor(float))", ""])
def test_unknown_onnx_type_is_unsupported(onnx_type: str) -> None:
    with pytest.raises(Unsupported, match="not supported"):
        datatype_of_onnx(onnx_type)


# ---- decode: round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("shape", [(2, 3), (0, 3), (1, 3)])
def test_decode_raw_as_tritonclient_sends_it(datatype: str, shape: tuple[int, ...]) -> None:
    arr = sample(datatype, shape)
    decoded = decode_inputs(client_request({"INPUT0": arr}), [spec(datatype, (-1, 3))], MODEL)
    assert list(decoded) == ["INPUT0"]
    assert_same(decoded["INPUT0"], arr)
    if datatype == "BYTES":
        assert all(type(v) is str for v in decoded["INPUT0"].reshape(-1))


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "BYTES"])
def test_decode_raw_is_zero_copy(datatype: str) -> None:
    decoded = decode_inputs(client_request({"X": sample(datatype, (4, 2))}), [spec(datatype, (4, 2), "X")], MODEL)
    owner = decoded["X"]
    while isinstance(owner, np.ndarray):
        assert not owner.flags.owndata
        owner = owner.base
    assert isinstance(owner, bytes)  # the request's own buffer, not a copy


@pytest.mark.parametrize("datatype", TYPED_DATATYPES)
def test_decode_typed_contents(datatype: str) -> None:
    arr = sample(datatype, (2, 3))
    decoded = decode_inputs(typed_request("INPUT0", datatype, arr), [spec(datatype, (-1, 3))], MODEL)
    assert_same(decoded["INPUT0"], arr)


def test_decode_scalar_and_several_inputs_in_any_order() -> None:
    specs = [spec("FP32", (), "S"), spec("BYTES", (-1,), "B"), spec("INT64", (2, -1, 2), "T")]
    arrays = {"T": sample("INT64", (2, 0, 2)), "S": np.array(3.5, np.float32), "B": sample("BYTES", (4,))}
    decoded = decode_inputs(client_request(arrays), index_specs(specs), MODEL)
    for name, arr in arrays.items():
        assert_same(decoded[name], arr)


def test_index_specs_is_interchangeable_with_the_sequence() -> None:
    specs = (spec("FP32", (-1, 16), "INPUT0"), spec("INT32", (-1,), "INPUT1"))
    request = client_request({"INPUT1": sample("INT32", (1,)), "INPUT0": sample("FP32", (1, 16))})
    via_sequence = decode_inputs(request, specs, MODEL)
    via_index = decode_inputs(request, index_specs(specs), MODEL)
    assert via_sequence.keys() == via_index.keys()
    for name in via_index:
        assert_same(via_index[name], via_sequence[name])
    assert list(index_specs(specs)) == ["INPUT0", "INPUT1"]


# ---- requested outputs -------------------------------------------------------------------------------

OUTPUTS = [spec(name="OUTPUT0"), spec(name="OUTPUT1"), spec(name="OUTPUT2")]


def test_requested_outputs_default_to_all_in_model_order() -> None:
    request = client_request({"INPUT0": FP32_1x16})
    assert requested_outputs(request, OUTPUTS, MODEL) == ["OUTPUT0", "OUTPUT1", "OUTPUT2"]
    assert requested_outputs(request, index_specs(OUTPUTS), MODEL) == ["OUTPUT0", "OUTPUT1", "OUTPUT2"]


def test_requested_outputs_keep_request_order() -> None:
    request = client_request({"INPUT0": FP32_1x16}, outputs=["OUTPUT2", "OUTPUT0", "OUTPUT2"])
    assert requested_outputs(request, OUTPUTS, MODEL) == ["OUTPUT2", "OUTPUT0"]
    assert requested_outputs(request, index_specs(OUTPUTS), MODEL) == ["OUTPUT2", "OUTPUT0"]


def test_unknown_requested_output() -> None:
    request = client_request({"INPUT0": FP32_1x16}, outputs=["OUTPUT0", "NOPE"])
    with pytest.raises(InvalidInput) as caught:
        requested_outputs(request, OUTPUTS, MODEL)
    assert str(caught.value) == "unexpected inference output 'NOPE' for model 'm'"


def test_classification_is_unsupported() -> None:
    request = tpb.ModelInferRequest(model_name=MODEL)
    request.outputs.append(tg.InferRequestedOutput("OUTPUT0", class_count=3)._get_tensor())
    with pytest.raises(Unsupported, match="'OUTPUT0'"):
        requested_outputs(to_pb(request), OUTPUTS, MODEL)


# ---- encode -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("shape", [(2, 3), (0, 4), (), (1, 1, 5)])
def test_encode_read_by_tritonclient(datatype: str, shape: tuple[int, ...]) -> None:
    arr = sample(datatype, shape, seed=3)
    request = client_request({"INPUT0": FP32_1x16})
    response = encode_response(request, MODEL, "7", ["OUT"], [arr])
    assert (response.model_name, response.model_version, response.id) == (MODEL, "7", "req-7")
    assert len(response.raw_output_contents) == 1
    output = client_result(response).get_output("OUT")
    assert (output.datatype, list(output.shape)) == (datatype, list(shape))
    got = client_result(response).as_numpy("OUT")
    if datatype == "BYTES":
        # tritonclient hands BYTES back as bytes; the wire carries UTF-8.
        assert [v.decode() for v in got.reshape(-1)] == arr.reshape(-1).tolist()
        assert got.shape == arr.shape
    else:
        assert_same(got, arr)


def test_encode_several_outputs_keep_order_and_pairing() -> None:
    arrays = [sample("INT8", (2, 2)), sample("BYTES", (3,)), sample("FP64", (1,))]
    response = encode_response(pb.ModelInferRequest(), MODEL, "1", ["A", "B", "C"], arrays)
    assert [o.name for o in response.outputs] == ["A", "B", "C"]
    result = client_result(response)
    assert_same(result.as_numpy("A"), arrays[0])
    assert_same(result.as_numpy("C"), arrays[2])


def test_encode_non_contiguous_and_big_endian_arrays() -> None:
    base = np.arange(12, dtype=np.int32).reshape(3, 4)
    big = np.arange(6, dtype=">f8").reshape(2, 3)
    response = encode_response(pb.ModelInferRequest(), MODEL, "1", ["T", "B"], [base.T, big])
    result = client_result(response)
    assert_same(result.as_numpy("T"), np.ascontiguousarray(base.T))
    assert result.get_output("B").datatype == "FP64"
    np.testing.assert_array_equal(result.as_numpy("B"), big)


def test_encode_bytes_elements_of_every_kind() -> None:
    mixed = np.array([b"\xff\x00raw", "text", np.str_("np"), 7], dtype=object)
    response = encode_response(
        pb.ModelInferRequest(), MODEL, "1", ["M", "U", "S"], [mixed, np.array(["ab", "ü"]), np.array([b"x", b"yz"])]
    )
    result = client_result(response)
    assert result.as_numpy("M").tolist() == [b"\xff\x00raw", b"text", b"np", b"7"]
    assert result.as_numpy("U").tolist() == [b"ab", "ü".encode()]
    assert result.as_numpy("S").tolist() == [b"x", b"yz"]
    assert deserialize_bytes_tensor(response.raw_output_contents[0]).tolist() == result.as_numpy("M").tolist()


def test_encode_rejects_mismatched_names_and_arrays() -> None:
    with pytest.raises(ValueError):
        encode_response(pb.ModelInferRequest(), MODEL, "1", ["A", "B"], [np.zeros(1)])


@pytest.mark.parametrize("datatype", DATATYPES)
def test_full_cycle_identity(datatype: str) -> None:
    """decode -> (identity model) -> encode, read back by tritonclient, is the client's own array."""
    arr = sample(datatype, (3, 2), seed=9)
    request = client_request({"INPUT0": arr}, outputs=["OUTPUT0"])
    specs = [spec(datatype, (-1, 2))]
    decoded = decode_inputs(request, specs, MODEL)
    names = requested_outputs(request, [spec(datatype, (-1, 2), "OUTPUT0")], MODEL)
    response = encode_response(request, MODEL, "1", names, [decoded["INPUT0"]])
    again = decode_inputs(
        to_pb(
            tpb.ModelInferRequest(
                inputs=[tpb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype=datatype, shape=[3, 2])],
                raw_input_contents=list(response.raw_output_contents),
            )
        ),
        specs,
        MODEL,
    )
    assert_same(again["INPUT0"], arr)


# ---- fuzz: nothing but InvalidInput/Unsupported, whatever arrives ----------------------------------

FUZZ_SPECS = [
    spec("FP32", (-1, 4), "A"),
    spec("BYTES", (-1,), "B"),
    spec("INT8", (2, -1), "C"),
    spec("FP16", (3,), "D"),
    spec("BOOL", (), "E"),
    spec("UINT64", (-1, -1, 2), "F"),
]
INTERESTING_INTS = [0, 1, 2, 3, 4, -1, -2, 2**31, 2**31 - 1, 2**32, 2**62, 2**63 - 1, -(2**63)]


def mutate(rng: random.Random, request: pb.ModelInferRequest) -> pb.ModelInferRequest:
    for _ in range(rng.randint(1, 3)):
        choice = rng.randrange(11)
        tensor = rng.choice(request.inputs) if request.inputs else None
        if choice == 0 and tensor is not None:
            tensor.datatype = rng.choice([*DATATYPES, "BF16", "", "fp32", "\x00"])
        elif choice == 1 and tensor is not None:
            tensor.shape[:] = [rng.choice(INTERESTING_INTS) for _ in range(rng.randint(0, 4))]
        elif choice == 2 and request.raw_input_contents:
            i = rng.randrange(len(request.raw_input_contents))
            data = bytearray(request.raw_input_contents[i])
            for _ in range(rng.randint(1, 4)):
                if data and rng.random() < 0.5:
                    data[rng.randrange(len(data))] = rng.randrange(256)
                elif rng.random() < 0.5:
                    del data[rng.randrange(len(data) + 1) :]
                else:
                    data += rng.randbytes(rng.randint(1, 9))
            request.raw_input_contents[i] = bytes(data)
        elif choice == 3 and tensor is not None:
            field = rng.choice(list(pb.InferTensorContents.DESCRIPTOR.fields_by_name))
            values = [rng.choice(INTERESTING_INTS) for _ in range(rng.randint(0, 6))]
            container = getattr(tensor.contents, field)
            if field == "bytes_contents":
                container.extend(rng.randbytes(rng.randint(0, 4)) for _ in values)
            elif field == "bool_contents":
                container.extend(bool(v) for v in values)
            elif field in ("fp32_contents", "fp64_contents"):
                container.extend(float(v) for v in values)
            else:
                info = {"int_contents": (-(2**31), 2**31 - 1), "uint_contents": (0, 2**32 - 1)}
                lo, hi = info.get(field, (-(2**63), 2**63 - 1) if field == "int64_contents" else (0, 2**64 - 1))
                container.extend(min(max(v, lo), hi) for v in values)
        elif choice == 4:
            del request.raw_input_contents[:]
        elif choice == 5 and tensor is not None:
            request.inputs.append(tensor)
        elif choice == 6 and request.inputs:
            del request.inputs[rng.randrange(len(request.inputs))]
        elif choice == 7 and tensor is not None:
            tensor.name = rng.choice(["A", "B", "C", "Z", "", "é"])
        elif choice == 8:
            request.raw_input_contents.append(rng.randbytes(rng.randint(0, 8)))
        elif choice == 9:
            request.outputs.add(name=rng.choice(["A", "Q", ""]))
        else:
            wire = bytearray(request.SerializeToString())
            for _ in range(rng.randint(1, 3)):
                if wire:
                    wire[rng.randrange(len(wire))] = rng.randrange(256)
            # An unparseable message never reaches the codec; keep the unmutated one then.
            with contextlib.suppress(Exception):
                request = pb.ModelInferRequest.FromString(bytes(wire))
    return request


def valid_request(rng: random.Random) -> tuple[list[TensorSpec], pb.ModelInferRequest]:
    """A random model (subset of FUZZ_SPECS) and a request it accepts, raw or typed."""
    typed = rng.random() < 0.3
    candidates = [s for s in FUZZ_SPECS if not (typed and s.datatype == "FP16")]
    specs = rng.sample(candidates, k=rng.randint(1, len(candidates)))
    arrays, datatypes = {}, {}
    for s in rng.sample(specs, k=len(specs)):
        shape = tuple(d if d != -1 else rng.randint(0, 3) for d in s.shape)
        arrays[s.name], datatypes[s.name] = sample(s.datatype, shape, seed=rng.randrange(1000)), s.datatype
    if not typed:
        return specs, client_request(arrays, datatypes)
    request = pb.ModelInferRequest(model_name=MODEL)
    for name, arr in arrays.items():
        request.MergeFrom(typed_request(name, datatypes[name], arr))
    return specs, request


def test_fuzzed_requests_raise_only_protocol_errors() -> None:
    rng = random.Random(20240611)
    decoded_ok = rejected = 0
    for _ in range(3000):
        specs, request = valid_request(rng)
        request = mutate(rng, request)
        try:
            arrays = decode_inputs(request, specs if rng.random() < 0.5 else index_specs(specs), MODEL)
            requested_outputs(request, specs, MODEL)
        except (InvalidInput, Unsupported) as error:
            assert names_the_model(str(error)), error
            rejected += 1
            continue
        decoded_ok += 1
        assert [t.name for t in request.inputs] == list(arrays)
        for tensor in request.inputs:
            assert arrays[tensor.name].shape == tuple(tensor.shape)
    # The generator must produce both outcomes, or the test proves nothing.
    assert decoded_ok > 150 and rejected > 1500, (decoded_ok, rejected)
