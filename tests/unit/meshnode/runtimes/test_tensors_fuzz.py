"""Property-based tests of the tensor decoder (meshnode.runtimes.tensors), as the ONNX runtime uses it.

Whatever a client puts in a ModelInferRequest (any datatype string, any shape, raw bytes of any length, typed
contents of the wrong kind, missing, extra or duplicate inputs, unknown outputs, parameters), the decoder either
returns arrays that match the model's inputs or raises InvalidInput / Unsupported, whose status a client can
act on: never another exception, and never memory in proportion to a shape the request merely claims.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.local import models as examples
from meshnode.errors import InvalidInput, Unsupported
from meshnode.runtimes.base import TensorSpec
from meshnode.runtimes.onnx import OnnxModel, OnnxRuntime
from meshnode.runtimes.tensors import DATATYPE_TO_NUMPY, MAX_ELEMENTS, decode_inputs, index_specs, requested_outputs
from meshnode.storage.repository import ModelSource
from meshpb import pb
from tests.unit.meshnode.runtimes.tensor_cases import names_the_model
from tests.unit.meshnode.runtimes.tensor_strategies import (
    ABSURD_DIMS,
    DATATYPES,
    infer_requests,
    raw_bytes,
    tensor_specs,
)

pytestmark = pytest.mark.timeout(60)

MODEL = "m"
CLIENT_CODES = {"INVALID_ARGUMENT", "UNIMPLEMENTED"}
# Error messages go back in gRPC trailers: whatever the client sent, they stay short.
MAX_MESSAGE = 1000
# What decoding may allocate beyond the request itself: a few Python objects per element of a request that
# is at most a few KB, never anything in proportion to a claimed shape (2**31 elements of FP64: 16 GiB).
MEMORY_SLACK = 1 << 20
MEMORY_PER_REQUEST_BYTE = 64

# derandomize: the same examples on every run (CI is reproducible); database=None: no example database.
FUZZ = settings(deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

T = TypeVar("T")


def bounded(request: pb.ModelInferRequest, call: Callable[[], T]) -> T:
    """call(), failing if it allocated more than the request's size warrants (numpy reports to tracemalloc)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        return call()
    finally:
        peak = tracemalloc.get_traced_memory()[1] - before
        if started:
            tracemalloc.stop()
        limit = MEMORY_SLACK + MEMORY_PER_REQUEST_BYTE * request.ByteSize()
        assert peak <= limit, f"decoding a {request.ByteSize()}-byte request allocated {peak} bytes"


def assert_client_error(error: InvalidInput | Unsupported) -> None:
    message = str(error)
    assert error.code.name in CLIENT_CODES
    assert names_the_model(message), message
    assert len(message) <= MAX_MESSAGE, message[:200]


def assert_decoded(request: pb.ModelInferRequest, specs: list[TensorSpec], arrays: dict[str, np.ndarray]) -> None:
    """A decoded request had exactly the model's inputs, and each array is what its tensor says."""
    by_name = index_specs(specs)
    assert sorted(arrays) == sorted(by_name) == sorted(t.name for t in request.inputs)
    raws = request.raw_input_contents
    for i, tensor in enumerate(request.inputs):
        spec, arr = by_name[tensor.name], arrays[tensor.name]
        assert tensor.datatype == spec.datatype
        assert arr.shape == tuple(tensor.shape)
        assert len(spec.shape) == arr.ndim and all(w in (-1, g) for w, g in zip(spec.shape, arr.shape, strict=True))
        assert arr.dtype == DATATYPE_TO_NUMPY[spec.datatype]
        assert arr.size <= max(request.ByteSize(), 1)  # every element came with at least a byte of data
        if spec.datatype == "BYTES":
            assert all(isinstance(v, str) for v in arr.reshape(-1).tolist())
        elif raws:
            assert arr.tobytes() == raws[i]
            if spec.datatype == "BOOL":
                assert set(arr.view(np.uint8).reshape(-1).tolist()) <= {0, 1}


def decode_or_reject(request: pb.ModelInferRequest, specs: list[TensorSpec]) -> dict[str, np.ndarray] | None:
    try:
        arrays = bounded(request, lambda: decode_inputs(request, specs, MODEL))
    except (InvalidInput, Unsupported) as error:
        assert_client_error(error)
        return None
    # Anything else (IndexError, ValueError, OverflowError, MemoryError, ...) fails the test with the example.
    assert_decoded(request, specs, arrays)
    return arrays


@st.composite
def models_and_requests(draw: st.DrawFn) -> tuple[list[TensorSpec], list[TensorSpec], pb.ModelInferRequest]:
    inputs, outputs = draw(tensor_specs()), draw(tensor_specs())
    return inputs, outputs, draw(infer_requests(inputs, outputs, MODEL))


@settings(FUZZ, max_examples=100)
@given(case=models_and_requests())
def test_any_request_decodes_or_is_rejected_as_the_clients_error(
        case: tuple[list[TensorSpec], list[TensorSpec], pb.ModelInferRequest]) -> None:
    inputs, _, request = case
    arrays = decode_or_reject(request, inputs)
    # The index the ONNX runtime computes once per model decodes the same way.
    try:
        indexed = decode_inputs(request, index_specs(inputs), MODEL)
    except (InvalidInput, Unsupported):
        assert arrays is None
    else:
        assert arrays is not None and list(indexed) == list(arrays)
        assert all(indexed[n].tolist() == arrays[n].tolist() for n in arrays if arrays[n].dtype == object)
        assert all(indexed[n].tobytes() == arrays[n].tobytes() for n in arrays if arrays[n].dtype != object)


@settings(FUZZ, max_examples=60)
@given(case=models_and_requests())
def test_requested_outputs_are_the_models_outputs_or_a_clients_error(
        case: tuple[list[TensorSpec], list[TensorSpec], pb.ModelInferRequest]) -> None:
    _, outputs, request = case
    try:
        names = requested_outputs(request, index_specs(outputs), MODEL)
    except (InvalidInput, Unsupported) as error:
        assert_client_error(error)
        return
    known = [s.name for s in outputs]
    asked = list(dict.fromkeys(o.name for o in request.outputs))
    assert names == (asked or known) and set(names) <= set(known)


@st.composite
def absurd_requests(draw: st.DrawFn) -> tuple[list[TensorSpec], pb.ModelInferRequest]:
    """One input whose shape claims far more elements than a gRPC message holds, with a few bytes of data."""
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(st.lists(st.one_of(st.sampled_from(ABSURD_DIMS), st.integers(0, 3)), min_size=1, max_size=4)
                 .filter(lambda s: any(abs(d) >= 65536 for d in s)))
    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
    how = draw(st.sampled_from(["raw", "raw-bytes", "typed", "none"]))
    if how == "raw":
        request.raw_input_contents.append(draw(st.binary(max_size=64)))
    elif how == "raw-bytes":
        request.raw_input_contents.append(raw_bytes(draw(st.lists(st.binary(max_size=4), max_size=8))))
    elif how == "typed":
        tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=4), max_size=8)))
    return [TensorSpec("INPUT0", datatype, (-1,) * len(shape))], request


@settings(FUZZ, max_examples=60)
@given(case=absurd_requests())
def test_a_claimed_huge_shape_is_rejected_without_allocating_it(
        case: tuple[list[TensorSpec], pb.ModelInferRequest]) -> None:
    specs, request = case
    arrays = decode_or_reject(request, specs)
    if arrays is not None:  # only a shape with a 0 dim (and the rest within MAX_ELEMENTS) is a valid tensor
        shape = list(request.inputs[0].shape)
        assert 0 in shape and arrays["INPUT0"].size == 0 and all(0 <= d <= MAX_ELEMENTS for d in shape)


# ---- through OnnxModel.infer: decoding, then ONNX Runtime on what was decoded --------------------------------

ONNX_DATATYPES = ["FP32", "INT64", "BOOL", "BYTES", "UINT8", "FP16"]


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[OnnxModel]]:
    root = tmp_path_factory.mktemp("fuzz-models")
    dirs = [examples.write_add_sub(root, "simple", width=2)]
    dirs += [examples.write_identity(root, f"id_{d.lower()}", d, shape=(-1, 2)) for d in ONNX_DATATYPES]
    runtime = OnnxRuntime()

    async def load() -> list[OnnxModel]:
        loaded = []
        for directory in dirs:
            version = directory / "1"
            loaded.append(await runtime.load(ModelSource(directory.name, "1", version, version / "model.onnx")))
        return loaded

    models = asyncio.run(load())
    yield models
    asyncio.run(runtime.close())


def _onnx_case(model: OnnxModel) -> st.SearchStrategy[pb.ModelInferRequest]:
    return infer_requests(list(model.inputs), list(model.outputs), model.name)


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_onnx_model_answers_any_request_or_rejects_it_as_the_clients_error(
        onnx_models: list[OnnxModel], data: st.DataObject) -> None:
    model = data.draw(st.sampled_from(onnx_models), label="model")
    request = data.draw(_onnx_case(model), label="request")
    try:
        response = asyncio.run(model.infer(request))
    except (InvalidInput, Unsupported) as error:
        message = str(error)
        assert error.code.name in CLIENT_CODES and model.name in message and len(message) <= MAX_MESSAGE
        return
    assert response.model_name == model.name and response.id == request.id
    assert len(response.outputs) == len(response.raw_output_contents) >= 1
    assert {o.name for o in response.outputs} <= {s.name for s in model.outputs}

