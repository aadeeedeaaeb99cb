"""KServe v2 tensors <-> numpy: the per-request codec of the in-process runtimes.

This is the hot path of every inference, so the common case (raw numeric contents, which is what tritonclient
sends) is a few lookups and one zero-copy np.frombuffer per input. Anything a client can get wrong raises
InvalidInput (or Unsupported) naming the input and the model in Triton's wording, which clients match on.
A model should call index_specs() once at load and pass its result instead of the spec tuple.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Iterable, Sequence
from typing import NoReturn

import numpy as np

from meshnode.errors import InvalidInput, Unsupported
from meshnode.runtimes.base import TensorSpec
from meshpb import pb

# Explicit little-endian: the protocol's byte order, whatever the host's.
DATATYPE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

_NUMPY_TO_DATATYPE: dict[np.dtype, str] = {dt: name for name, dt in DATATYPE_TO_NUMPY.items()}

# ORT names most element types after numpy's dtype names; float, double and string are the exceptions.
_ONNX_TO_DATATYPE: dict[str, str] = {
    f"tensor({dt.name})": name for name, dt in DATATYPE_TO_NUMPY.items() if dt.kind in "biu" or name == "FP16"
} | {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(string)": "BYTES"}

# The one InferTensorContents field each datatype may use; FP16 has none (raw only).
_CONTENTS_FIELD: dict[str, str] = (
    dict.fromkeys(("INT8", "INT16", "INT32"), "int_contents")
    | dict.fromkeys(("UINT8", "UINT16", "UINT32"), "uint_contents")
    | {dt: f"{dt.lower()}_contents" for dt in ("BOOL", "INT64", "UINT64", "FP32", "FP64", "BYTES")}
)

# Far beyond any gRPC message, and small enough that numpy never overflows computing a size.
MAX_ELEMENTS = 2**31

_LEN = struct.Struct("<I")
_BOOL_BYTES = b"\x00\x01"
_ECHO = 16  # most dims or names an error message repeats back
_FIXED_WIDTH: dict[str, np.dtype] = {name: dt for name, dt in DATATYPE_TO_NUMPY.items() if name != "BYTES"}

SpecIndex = dict[str, TensorSpec]
_Input = pb.ModelInferRequest.InferInputTensor


def index_specs(specs: Iterable[TensorSpec]) -> SpecIndex:
    """Name -> spec in model order; compute once per model and pass to decode_inputs/requested_outputs."""
    return {spec.name: spec for spec in specs}


def datatype_of_numpy(dtype: np.dtype) -> str:
    # Fixed-size str/bytes arrays (U, S), numpy 2 StringDType (T) and object arrays all travel as BYTES.
    if dtype.kind in "OSUT":
        return "BYTES"
    datatype = _NUMPY_TO_DATATYPE.get(dtype.newbyteorder("<"))
    if datatype is None:
        raise Unsupported(f"numpy dtype '{dtype}' has no KServe datatype")
    return datatype


def datatype_of_onnx(onnx_type: str) -> str:
    try:
        return _ONNX_TO_DATATYPE[onnx_type]
    except KeyError:
        raise Unsupported(f"ONNX type '{onnx_type}' is not supported") from None


def _dims(shape: Sequence[int]) -> str:
    # Error messages echo client data, so a million-dim shape must not become a megabyte message.
    text = ",".join(str(d) for d in shape[:_ECHO])
    return f"[{text}{',...' if len(shape) > _ECHO else ''}]"


def _names(names: Iterable[str]) -> list[str]:
    return [_clip(n) for n in itertools.islice(names, _ECHO)]


def _clip(text: str) -> str:
    # Client-chosen strings go back in status messages, which clients cap at a few KB of metadata.
    return text if len(text) <= 64 else text[:64] + "..."


def _bad_shape(name: str, model: str, want: Sequence[int], got: Sequence[int]) -> NoReturn:
    if any(d < 0 for d in got):
        raise InvalidInput(f"invalid shape for input '{name}' for model '{model}': negative dimension in {_dims(got)}")
    raise InvalidInput(
        f"unexpected shape for input '{name}' for model '{model}'. Expected {_dims(want)}, got {_dims(got)}"
    )


def _check_names(request: pb.ModelInferRequest, by_name: SpecIndex, model: str) -> NoReturn:
    """Error path only: find the most specific reason the input set does not match the model."""
    seen: dict[str, None] = {}
    for tensor in request.inputs:
        if tensor.name not in by_name:
            raise InvalidInput(f"unexpected inference input '{_clip(tensor.name)}' for model '{model}'")
        if tensor.name in seen:
            raise InvalidInput(f"input '{tensor.name}' appears more than once in request for model '{model}'")
        seen[tensor.name] = None
    missing = [n for n in by_name if n not in seen]
    raise InvalidInput(
        f"expected {len(by_name)} inputs but got {len(seen)} inputs for model '{model}'. "
        f"Got input(s) {_names(seen)}, but missing required input(s) {_names(missing)}. "
        "Please provide all required input(s)."
    )


def _split_bytes(raw: bytes, count: int, name: str, model: str) -> list[memoryview]:
    # Each element needs at least its 4-byte length, so a short buffer is rejected before looping.
    if count * 4 > len(raw):
        raise InvalidInput(
            f"input byte size mismatch for input '{name}' for model '{model}'. "
            f"Expected at least {count * 4} bytes for {count} BYTES elements, got {len(raw)}"
        )
    view = memoryview(raw)
    end = len(raw)
    offset = 0
    items: list[memoryview] = []
    for _ in range(count):
        if offset + 4 > end:
            raise InvalidInput(f"input '{name}' for model '{model}' has fewer than {count} BYTES elements")
        stop = offset + 4 + _LEN.unpack_from(raw, offset)[0]
        if stop > end:
            raise InvalidInput(f"BYTES element of input '{name}' for model '{model}' overruns its data")
        items.append(view[offset + 4 : stop])
        offset = stop
    if offset != end:
        raise InvalidInput(
            f"input '{name}' for model '{model}' has {end - offset} bytes after its {count} BYTES elements"
        )
    return items


def _strings(items: Sequence[bytes | memoryview], shape: list[int], name: str, model: str) -> np.ndarray:
    """ORT takes string tensors as object arrays of str, so BYTES elements must be UTF-8."""
    arr = np.empty(len(items), dtype=object)
    try:
        arr[:] = [str(item, "utf-8") for item in items]
    except UnicodeDecodeError:
        raise InvalidInput(f"input '{name}' for model '{model}' has a BYTES element that is not UTF-8") from None
    return arr.reshape(shape)


def _unsupported(spec: TensorSpec, model: str) -> NoReturn:
    # Only a model's own spec can carry a datatype we lack (e.g. BF16), since requests must match it.
    raise Unsupported(f"input '{spec.name}' of model '{model}' has unsupported datatype {spec.datatype}")


def _from_contents(tensor: _Input, spec: TensorSpec, shape: list[int], count: int, model: str) -> np.ndarray:
    name, datatype = spec.name, spec.datatype
    if datatype not in DATATYPE_TO_NUMPY:
        _unsupported(spec, model)
    field = _CONTENTS_FIELD.get(datatype)
    set_fields = tensor.contents.ListFields()
    if field is None and (set_fields or count):
        raise InvalidInput(f"input '{name}' for model '{model}': {datatype} data must be sent in raw_input_contents")
    if len(set_fields) > 1 or (set_fields and set_fields[0][0].name != field):
        got = ", ".join(f.name for f, _ in set_fields)
        raise InvalidInput(f"input '{name}' for model '{model}' is {datatype} but sets {got}, expected {field}")
    values = set_fields[0][1] if set_fields else ()
    if len(values) != count:
        if not values and "shared_memory_region" in tensor.parameters:
            raise Unsupported(f"input '{name}' for model '{model}' uses shared memory, which is not supported")
        raise InvalidInput(
            f"unexpected number of values for input '{name}' for model '{model}'. Expected {count}, got {len(values)}"
        )
    if datatype == "BYTES":
        return _strings(values, shape, name, model)
    try:
        return np.array(values, dtype=DATATYPE_TO_NUMPY[datatype]).reshape(shape)
    except OverflowError:
        raise InvalidInput(f"input '{name}' for model '{model}' has values out of range for {datatype}") from None


def _check_no_contents(inputs: Sequence[_Input], model_name: str) -> None:
    """With raw_input_contents, no input may have contents: Triton's words, for the first that has."""
    for tensor in inputs:
        if tensor.HasField("contents"):
            raise InvalidInput(f"contents field must not be specified when using raw_input_contents for "
                               f"'{tensor.name}' for model '{model_name}'")


def decode_inputs(
    request: pb.ModelInferRequest, specs: Sequence[TensorSpec] | SpecIndex, model_name: str
) -> dict[str, np.ndarray]:
    """Validate the request's inputs against the model's and return them by name as numpy arrays.

    Raw numeric inputs are read-only views of the request's bytes; BYTES become object arrays of str.
    """
    by_name = specs if isinstance(specs, dict) else index_specs(specs)
    # Slicing copies a upb repeated field into a list in C; iterating it element by element is slower.
    inputs = request.inputs[:]
    if len(inputs) != len(by_name):
        _check_names(request, by_name, model_name)
    raw_contents = request.raw_input_contents
    if len(raw_contents) and len(raw_contents) != len(inputs):
        _check_no_contents(inputs, model_name)  # Triton says this first, whatever the count
        raise InvalidInput(
            f"raw_input_contents has {len(raw_contents)} entries but request for model '{model_name}' "
            f"has {len(inputs)} inputs {_names(t.name for t in inputs)}"
        )
    use_raw = len(raw_contents) > 0
    arrays: dict[str, np.ndarray] = {}
    batch, unmatched = -1, ""  # the first input's batch size; an input whose batch size differs
    for i, tensor in enumerate(inputs):
        name = tensor.name
        spec = by_name.get(name)
        if spec is None or name in arrays:
            _check_names(request, by_name, model_name)
        if tensor.datatype != spec.datatype:
            raise InvalidInput(
                f"inference input '{name}' data-type is '{_clip(tensor.datatype)}', "
                f"but model '{model_name}' expects '{spec.datatype}'"
            )
        want = spec.shape
        shape = tensor.shape[:]
        if len(shape) != len(want):
            _bad_shape(name, model_name, want, shape)
        for w, g in zip(want, shape):  # noqa: B905 - lengths are equal here, and strict= is slower
            if g < 0 or (w != g and w != -1):
                _bad_shape(name, model_name, want, shape)
        if want and want[0] == -1:
            if batch < 0:
                batch = shape[0]
            elif shape[0] != batch and not unmatched:
                unmatched = name
        count = math.prod(shape)
        if count > MAX_ELEMENTS or (count == 0 and math.prod(d for d in shape if d) > MAX_ELEMENTS):
            raise InvalidInput(f"input '{name}' for model '{model_name}' has over {MAX_ELEMENTS} elements")
        if not use_raw:
            arrays[name] = _from_contents(tensor, spec, shape, count, model_name)
            continue
        if tensor.HasField("contents"):
            _check_no_contents(inputs, model_name)
        raw = raw_contents[i]
        dtype = _FIXED_WIDTH.get(spec.datatype)
        if dtype is None:
            if spec.datatype != "BYTES":
                _unsupported(spec, model_name)
            arrays[name] = _strings(_split_bytes(raw, count, name, model_name), shape, name, model_name)
        elif count * dtype.itemsize != len(raw):
            raise InvalidInput(
                f"input byte size mismatch for input '{name}' for model '{model_name}'. "
                f"Expected {count * dtype.itemsize}, got {len(raw)}"
            )
        # numpy would take any byte as a bool, and ORT would then see values that are neither 0 nor 1.
        elif dtype.kind == "b" and raw.translate(None, _BOOL_BYTES):
            raise InvalidInput(f"input '{name}' for model '{model_name}' has BOOL bytes other than 0 and 1")
        else:
            arrays[name] = np.frombuffer(raw, dtype).reshape(shape)
    # Triton's check for a model that takes a batch in every input's first dimension (max_batch_size > 0);
    # ONNX Runtime would otherwise fail the run on the broadcast, an INTERNAL error for a client's mistake.
    if unmatched and all(spec.shape and spec.shape[0] == -1 for spec in by_name.values()):
        raise InvalidInput(f"input '{unmatched}' batch size does not match other inputs for '{model_name}'")
    return arrays


def requested_outputs(
    request: pb.ModelInferRequest, specs: Sequence[TensorSpec] | SpecIndex, model_name: str
) -> list[str]:
    """Output names to compute, in request order (duplicates dropped, as Triton does); all if none asked."""
    if not request.outputs:
        return list(specs) if isinstance(specs, dict) else [s.name for s in specs]
    by_name = specs if isinstance(specs, dict) else index_specs(specs)
    names: list[str] = []
    for output in request.outputs:
        name = output.name
        if name not in by_name:
            raise InvalidInput(f"unexpected inference output '{_clip(name)}' for model '{model_name}'")
        # Silently returning unclassified tensors to a client that asked for top-k would mislead it.
        if output.parameters and "classification" in output.parameters:
            raise Unsupported(f"classification of output '{name}' for model '{model_name}' is not supported")
        if name not in names:
            names.append(name)
    return names


def _encode_bytes(arr: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in arr.reshape(-1).tolist():
        # tritonclient's rule: bytes travel as they are, anything else as its UTF-8 str().
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def encode_response(
    request: pb.ModelInferRequest,
    model_name: str,
    model_version: str,
    names: Sequence[str],
    arrays: Sequence[np.ndarray],
) -> pb.ModelInferResponse:
    """Build the response the way Triton does: every output in raw_output_contents, little-endian."""
    # Measured under upb: setting fields one by one beats keyword construction, nested or via add(**kw).
    response = pb.ModelInferResponse()
    response.model_name = model_name
    response.model_version = model_version
    response.id = request.id
    add_output = response.outputs.add
    raw = response.raw_output_contents
    for name, arr in zip(names, arrays, strict=True):
        dtype = arr.dtype
        datatype = _NUMPY_TO_DATATYPE.get(dtype) or datatype_of_numpy(dtype)
        output = add_output()
        output.name = name
        output.datatype = datatype
        output.shape.extend(arr.shape)
        if datatype == "BYTES":
            raw.append(_encode_bytes(arr))
        elif dtype.byteorder == ">":
            raw.append(arr.astype(dtype.newbyteorder("<")).tobytes())
        else:
            raw.append(arr.tobytes())
    return response
