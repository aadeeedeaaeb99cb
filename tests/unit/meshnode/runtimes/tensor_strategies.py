"""Hypothesis strategies for ModelInferRequests: mostly near-valid, so that fuzzing reaches every check of the
decoder (meshnode.runtimes.tensors) instead of stopping at the first, and sometimes plain garbage.

Shared by the unit fuzz tests of the decoder and the end-to-end fuzz test of ModelInfer. Every size is capped:
valid data is written for at most MAX_COUNT elements, and a shape that claims more (an absurd one, on purpose)
never comes with more than a few dozen bytes of data, so a decoder that allocated by the claimed shape would
show up as a failure (or a MemoryError), never as a slow test.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from hypothesis import strategies as st

from meshnode.runtimes.base import TensorSpec
from meshnode.runtimes.tensors import _CONTENTS_FIELD, DATATYPE_TO_NUMPY
from meshpb import pb

DATATYPES = list(DATATYPE_TO_NUMPY)
# A datatype only a model's own spec can carry (ORT has bfloat16; the decoder does not).
SPEC_DATATYPES = [*DATATYPES, "BF16"]
NAMES = ["INPUT0", "INPUT1", "x"]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Dims that overflow a product, a numpy shape, a C long or the decoder's element cap.
ABSURD_DIMS = [2**31 - 1, 2**31, 2**31 + 1, 2**32, 2**40, 2**62, INT64_MAX, 65536, -1, -2, INT64_MIN]
MAX_COUNT = 64

byte_values = st.one_of(st.binary(max_size=6), st.text(max_size=4).map(str.encode))
FIELD_VALUES: dict[str, st.SearchStrategy[object]] = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(INT64_MIN, INT64_MAX),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": byte_values,
}
FIELDS = list(FIELD_VALUES)

mostly = st.sampled_from([True] * 5 + [False])
datatype_texts = st.one_of(
    st.sampled_from(SPEC_DATATYPES),
    st.sampled_from(["", "fp32", "FP32 ", "TYPE_FP32", "FP8", "BF16", "STRING", "INT128", "\x00"]),
    st.text(max_size=8),
)
dims = st.one_of(st.integers(0, 3), st.sampled_from(ABSURD_DIMS), st.integers(INT64_MIN, INT64_MAX))
shapes = st.one_of(st.lists(dims, max_size=4), st.lists(st.just(1), min_size=16, max_size=64))
names = st.one_of(st.sampled_from(NAMES), st.text(max_size=8), st.text(min_size=65, max_size=300))

# Values of each parameter kind; keys include the ones the node reads (shared memory, classification, the hop).
parameter_values = st.one_of(
    st.builds(pb.InferParameter, bool_param=st.booleans()),
    st.builds(pb.InferParameter, int64_param=st.integers(INT64_MIN, INT64_MAX)),
    st.builds(pb.InferParameter, string_param=st.text(max_size=16)),
    st.builds(pb.InferParameter, double_param=st.floats()),
    st.builds(pb.InferParameter, uint64_param=st.integers(0, 2**64 - 1)),
    st.just(pb.InferParameter()),  # no choice set at all
)
parameter_keys = st.one_of(
    st.sampled_from(["shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "classification",
                     "binary_data", "binary_data_size", "priority", "timeout", "sequence_id", "meshserve_hop"]),
    st.text(max_size=8),
)
parameter_maps = st.dictionaries(parameter_keys, parameter_values, max_size=3)


@st.composite
def tensor_specs(draw: st.DrawFn, max_size: int = 3) -> list[TensorSpec]:
    """A model's inputs or outputs: unique names, -1 for variable dims, an occasional datatype we lack."""
    count = draw(st.sampled_from([n for n in (1, 2, 3, 1, 2, 3, 1, 2, 0) if n <= max_size]))
    chosen = draw(st.permutations(NAMES))[:count]
    spec_shapes = st.lists(st.integers(-1, 3), max_size=3).map(tuple)
    return [TensorSpec(name, draw(st.sampled_from(SPEC_DATATYPES)), draw(spec_shapes)) for name in chosen]


def element_count(shape: Sequence[int]) -> int | None:
    """The tensor's element count if its shape is a small, valid one, else None."""
    if any(d < 0 for d in shape):
        return None
    count = math.prod(shape)
    return count if count <= MAX_COUNT else None


def raw_bytes(elements: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


@st.composite
def valid_raw(draw: st.DrawFn, datatype: str, count: int) -> bytes:
    """raw_input_contents as tritonclient writes it for `count` elements of `datatype`."""
    if datatype == "BYTES":
        return raw_bytes(draw(st.lists(byte_values, min_size=count, max_size=count)))
    if datatype == "BOOL":
        return b"".join(draw(st.lists(st.sampled_from([b"\x00", b"\x01"]), min_size=count, max_size=count)))
    size = count * DATATYPE_TO_NUMPY[datatype].itemsize
    return draw(st.binary(min_size=size, max_size=size))


@st.composite
def raw_contents(draw: st.DrawFn, datatype: str, shape: Sequence[int]) -> bytes:
    count = element_count(shape)
    if count is None or datatype not in DATATYPE_TO_NUMPY:
        return draw(st.binary(max_size=32))
    data = draw(valid_raw(datatype, count))
    damage = draw(st.sampled_from(["none"] * 5 + ["truncate", "extend", "garbage"]))
    if damage == "truncate":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if damage == "extend":
        return data + draw(st.binary(min_size=1, max_size=8))
    if damage == "garbage":
        return draw(st.binary(max_size=64))
    return data


@st.composite
def typed_contents(draw: st.DrawFn, datatype: str, shape: Sequence[int]) -> tuple[str, list[object]]:
    """One contents field and its values: mostly the right field and count, sometimes neither."""
    right = _CONTENTS_FIELD.get(datatype)
    field = right if right is not None and draw(mostly) else draw(st.sampled_from(FIELDS))
    count = element_count(shape)
    if count is not None and draw(mostly):
        return field, draw(st.lists(FIELD_VALUES[field], min_size=count, max_size=count))
    return field, draw(st.lists(FIELD_VALUES[field], max_size=8))


@st.composite
def concrete_shape(draw: st.DrawFn, spec_shape: Sequence[int]) -> list[int]:
    """A shape the spec accepts (-1 replaced by 0..3), or, sometimes, any shape at all."""
    if draw(mostly):
        return [draw(st.integers(0, 3)) if d == -1 else d for d in spec_shape]
    return draw(shapes)


@st.composite
def infer_requests(draw: st.DrawFn, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                   model_name: str = "m") -> pb.ModelInferRequest:
    """A request for a model with these inputs and outputs, right or wrong in any field a client sets."""
    request = pb.ModelInferRequest(model_name=model_name, id=draw(st.text(max_size=4)))
    tensors: list[tuple[str, str, list[int]]] = []
    for spec in draw(st.permutations(list(inputs))):
        tensors.append((spec.name, spec.datatype, draw(concrete_shape(spec.shape))))
    mutation = draw(st.sampled_from(["none"] * 6 + ["drop", "duplicate", "extra", "rename", "datatype", "datatype"]))
    if mutation == "drop" and tensors:
        del tensors[draw(st.integers(0, len(tensors) - 1))]
    elif mutation == "duplicate" and tensors:
        tensors.append(tensors[draw(st.integers(0, len(tensors) - 1))])
    elif mutation == "extra":
        tensors.append((draw(names), draw(datatype_texts), draw(shapes)))
    elif mutation == "rename" and tensors:
        i = draw(st.integers(0, len(tensors) - 1))
        tensors[i] = (draw(names), *tensors[i][1:])
    elif mutation == "datatype" and tensors:
        i = draw(st.integers(0, len(tensors) - 1))
        tensors[i] = (tensors[i][0], draw(datatype_texts), tensors[i][2])

    data = draw(st.sampled_from(["raw", "raw", "raw", "typed", "typed", "typed", "none", "both"]))
    for name, datatype, shape in tensors:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if data in ("raw", "both"):
            request.raw_input_contents.append(draw(raw_contents(datatype, shape)))
        if data in ("typed", "both") and (data == "typed" or draw(st.booleans())):
            field, values = draw(typed_contents(datatype, shape))
            getattr(tensor.contents, field).extend(values)
        for key, value in draw(parameter_maps).items():
            tensor.parameters[key].CopyFrom(value)
    miscount = draw(st.sampled_from(["none"] * 10 + ["append", "drop"]))
    if miscount == "append" and request.raw_input_contents:
        request.raw_input_contents.append(draw(st.binary(max_size=8)))
    elif miscount == "drop" and request.raw_input_contents:
        del request.raw_input_contents[-1]

    output_names = st.one_of(st.sampled_from([s.name for s in outputs]), names) if outputs else names
    for name in draw(st.lists(output_names, max_size=3)):
        output = request.outputs.add(name=name)
        for key, value in draw(parameter_maps).items():
            output.parameters[key].CopyFrom(value)
    for key, value in draw(parameter_maps).items():
        request.parameters[key].CopyFrom(value)
    return request
