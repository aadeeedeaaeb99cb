"""Inference requests and responses between KServe v2 JSON (with Triton's binary tensor extension) and
protobuf; any protobuf message as plain JSON.

Binary extension: the body is a JSON header of `Inference-Header-Content-Length` bytes followed by the
tensors' bytes, each input saying its share with the parameter `binary_data_size`, in order; those bytes are
the protocol's raw form (little-endian; BYTES as 4-byte lengths and the bytes). Every input travels to the
core as raw contents, as the protocol requires once one does. An output is answered in binary when the
request asks (`binary_data_output`, or the output's own `binary_data`).
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from meshnode.errors import InvalidInput
from meshnode.runtimes.tensors import DATATYPE_TO_NUMPY
from meshpb import pb

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data_output"  # the request's: every output in binary
BINARY_DATA = "binary_data"  # an output's own choice
_LENGTH = struct.Struct("<I")
# Parameters of the HTTP form only: they say how tensors travel here, and mean nothing to the core.
_TRANSPORT_PARAMETERS = frozenset((BINARY_OUTPUT, BINARY_SIZE, BINARY_DATA))


def parse_json(body: bytes | memoryview, what: str) -> Any:
    try:
        return json.loads(bytes(body)) if len(body) else {}
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidInput(f"malformed JSON in {what}: {error}") from None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def parameters_into(target: Any, parameters: Any, what: str) -> None:
    """JSON parameters (bool, integer or string values) into a protobuf parameter map."""
    for key, value in _object(parameters, what).items():
        if key in _TRANSPORT_PARAMETERS:
            continue
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        elif isinstance(value, str):
            target[key].string_param = value
        else:
            raise InvalidInput(f"parameter '{key}' of {what} must be a boolean, an integer or a string")


def infer_request(name: str, version: str, body: bytes, header_length: str | None) -> tuple[pb.ModelInferRequest,
                                                                                              bool, set[str]]:
    """The protobuf request, whether every output goes back in binary, and which outputs do by their own choice."""
    view = memoryview(body)
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH} must be a number of bytes, not {header_length!r}") from None
        if not 0 <= length <= len(view):
            raise InvalidInput(f"{HEADER_LENGTH} is {length}, but the body has {len(view)} bytes")
        header, binary = view[:length], view[length:]
    else:
        header, binary = view, view[:0]
    document = _object(parse_json(header, "the inference request"), "the inference request")
    request = pb.ModelInferRequest(model_name=name, model_version=version, id=str(document.get("id", "")))
    parameters = _object(document.get("parameters", {}), "the request's parameters")
    parameters_into(request.parameters, parameters, "the request")
    offset = 0
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("an inference request needs `inputs`, a list of tensors")
    for item in inputs:
        offset = _input(request, _object(item, "an input"), binary, offset)
    if offset != len(binary):
        raise InvalidInput(f"the body has {len(binary) - offset} bytes of binary data past what the inputs' "
                           f"{BINARY_SIZE} account for")
    binary_outputs: set[str] = set()
    for item in document.get("outputs", []):
        output = _object(item, "an output")
        out_name = str(output.get("name", ""))
        out_parameters = _object(output.get("parameters", {}), f"output '{out_name}''s parameters")
        if out_parameters.get(BINARY_DATA):
            binary_outputs.add(out_name)
        tensor = request.outputs.add(name=out_name)
        parameters_into(tensor.parameters, out_parameters, f"output '{out_name}'")
    return request, bool(parameters.get(BINARY_OUTPUT)), binary_outputs


def _input(request: pb.ModelInferRequest, item: dict[str, Any], binary: memoryview, offset: int) -> int:
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput("each input needs `name` (a string), `datatype` (a string) and `shape` (integers)")
    parameters = _object(item.get("parameters", {}), f"input '{name}''s parameters")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    parameters_into(tensor.parameters, parameters, f"input '{name}'")
    size = parameters.get(BINARY_SIZE)
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidInput(f"input '{name}' says {BINARY_SIZE} {size}, but {len(binary) - offset} bytes of "
                               "binary data are left in the body")
        request.raw_input_contents.append(bytes(binary[offset:offset + size]))
        return offset + size
    if "data" not in item:
        raise InvalidInput(f"input '{name}' has neither `data` nor the parameter {BINARY_SIZE}")
    request.raw_input_contents.append(_raw(name, datatype, shape, item["data"]))
    return offset


def _raw(name: str, datatype: str, shape: Sequence[int], data: Any) -> bytes:
    dtype = DATATYPE_TO_NUMPY.get(datatype)
    if dtype is None:
        raise InvalidInput(f"input '{name}' has datatype {datatype!r}, which JSON cannot carry here: expected one of "
                           f"{', '.join(DATATYPE_TO_NUMPY)}")
    try:
        array = np.asarray(data, dtype=dtype).reshape(-1)
    except (ValueError, TypeError, OverflowError) as error:
        raise InvalidInput(f"input '{name}': its data is not {datatype}: {error}") from None
    expected = math.prod(shape)
    if array.size != expected:
        raise InvalidInput(f"input '{name}' has {array.size} values for shape {list(shape)} ({expected} values)")
    if datatype == "BYTES":
        items = [v.encode() if isinstance(v, str) else bytes(v) if isinstance(v, bytes) else str(v).encode()
                 for v in array.tolist()]
        return b"".join(_LENGTH.pack(len(v)) + v for v in items)
    return array.tobytes()


def _values(datatype: str, raw: bytes) -> list[Any]:
    if datatype != "BYTES":
        return list(np.frombuffer(raw, DATATYPE_TO_NUMPY[datatype]).tolist())
    values, offset = [], 0
    while offset < len(raw):
        (length,) = _LENGTH.unpack_from(raw, offset)
        values.append(raw[offset + 4:offset + 4 + length].decode("utf-8", "replace"))
        offset += 4 + length
    return values


def infer_response(response: pb.ModelInferResponse, binary_all: bool, binary_names: set[str]) -> tuple[bytes, int]:
    """The body and the length of its JSON header (the whole body when no output is in binary)."""
    outputs, chunks = [], []
    for index, output in enumerate(response.outputs):
        item: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        parameters = parameter_values(output.parameters)
        raw = response.raw_output_contents[index] if index < len(response.raw_output_contents) else None
        if raw is None:  # a runtime that answered in typed contents
            raw = _raw(output.name, output.datatype, output.shape, _contents(output))
        if binary_all or output.name in binary_names:
            parameters[BINARY_SIZE] = len(raw)
            chunks.append(raw)
        else:
            item["data"] = _values(output.datatype, raw)
        if parameters:
            item["parameters"] = parameters
        outputs.append(item)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version,
                                "outputs": outputs}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = parameter_values(response.parameters)
    header = json.dumps(document, separators=(",", ":")).encode()
    return header + b"".join(chunks), len(header)


def _contents(output: Any) -> list[Any]:
    field = output.contents.ListFields()
    return list(field[0][1]) if field else []


def parameter_values(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A protobuf parameter map as JSON values, as Triton's HTTP answers them."""
    values = {}
    for key, value in parameters.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(value, choice)
    return values


def message_json(message: Message, defaults: bool = False) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP writes it: field names as in the proto, 64-bit integers as numbers,
    enums by name; fields at their default left out unless `defaults` (Triton writes configs and statistics
    whole; clients index them without checking)."""
    if not defaults:
        return {field.name: _field(field, value, defaults) for field, value in message.ListFields()}
    return {field.name: _field(field, getattr(message, field.name), defaults)
            for field in message.DESCRIPTOR.fields
            if field.containing_oneof is None or message.HasField(field.name)}


def _field(field: FieldDescriptor, value: Any, defaults: bool) -> Any:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        value_field = entry.fields_by_name["value"]
        return {key: _single(value_field, item, defaults) for key, item in value.items()}
    if field.is_repeated:
        return [_single(field, item, defaults) for item in value]
    return _single(field, value, defaults)


def _single(field: FieldDescriptor, value: Any, defaults: bool) -> Any:
    if field.message_type is not None:
        return message_json(value, defaults)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value
