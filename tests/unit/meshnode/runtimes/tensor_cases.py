"""Builders shared by the tensor tests: requests as tritonclient sends them, results as it reads them."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import tritonclient.grpc as tg
from tritonclient.grpc import service_pb2 as tpb

from meshnode.runtimes import tensors
from meshnode.runtimes.base import TensorSpec
from meshnode.runtimes.tensors import (
    DATATYPE_TO_NUMPY,
)
from meshpb import pb

MODEL = "m"
DATATYPES = list(DATATYPE_TO_NUMPY)
TYPED_DATATYPES = [d for d in DATATYPES if d != "FP16"]
STRINGS = ["", "a", "héllo wörld", "emoji \U0001f600", "nul\x00inside", "x" * 300]


def sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Values that exercise each type's whole range, so a wrong width or signedness shows up."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    if datatype == "BYTES":
        return np.array([STRINGS[i % len(STRINGS)] for i in range(size)], dtype=object).reshape(shape)
    dtype = DATATYPE_TO_NUMPY[datatype]
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    values = rng.normal(scale=1000, size=size).astype(dtype)
    values[:3] = [np.inf, -0.0, np.finfo(dtype).max][: min(3, size)]
    return values.reshape(shape)


def to_pb(message: object) -> pb.ModelInferRequest:
    return pb.ModelInferRequest.FromString(message.SerializeToString())  # type: ignore[attr-defined]


def client_request(
    arrays: dict[str, np.ndarray], datatypes: dict[str, str] | None = None, outputs: Sequence[str] = ()
) -> pb.ModelInferRequest:
    """What tritonclient.grpc.InferenceServerClient.infer puts on the wire."""
    request = tpb.ModelInferRequest(model_name=MODEL, model_version="", id="req-7")
    for name, arr in arrays.items():
        datatype = (datatypes or {}).get(name) or tensors.datatype_of_numpy(arr.dtype)
        infer_input = tg.InferInput(name, list(arr.shape), datatype).set_data_from_numpy(arr)
        request.inputs.append(infer_input._get_tensor())
        request.raw_input_contents.append(infer_input._get_content())
    for name in outputs:
        request.outputs.append(tg.InferRequestedOutput(name)._get_tensor())
    return to_pb(request)


def typed_request(name: str, datatype: str, arr: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=arr.shape)
    values = arr.reshape(-1).tolist()
    if datatype == "BYTES":
        values = [v.encode() for v in values]
    getattr(tensor.contents, tensors._CONTENTS_FIELD[datatype]).extend(values)
    return request


def client_result(response: pb.ModelInferResponse) -> tg.InferResult:
    return tg.InferResult(tpb.ModelInferResponse.FromString(response.SerializeToString()))


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object
        assert got.tolist() == want.tolist()
    else:
        assert got.dtype == want.dtype
        assert got.tobytes() == want.tobytes()  # bitwise, so NaN and -0.0 compare too


def raw_bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def names_the_model(message: str) -> bool:
    """A rejection names the model, in Triton's words: "for model 'm'", or "for 'm'" (a batch size mismatch)."""
    return f"model '{MODEL}'" in message or f"for '{MODEL}'" in message


def spec(datatype: str = "FP32", shape: tuple[int, ...] = (-1, 16), name: str = "INPUT0") -> TensorSpec:
    return TensorSpec(name, datatype, shape)


FP32_1x16 = sample("FP32", (1, 16))
