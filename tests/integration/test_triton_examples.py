"""Triton's example clients (tritonclient's src/python/examples/simple_grpc_*.py) replayed against 3-node meshes.

Each test makes the calls one example makes, with its models, inputs and checks (outputs, error status and
wording), through the node holding the model and through one that forwards to it. One mesh runs ONNX Runtime
(Triton's simple, simple_int8, simple_string, simple_identity and simple_sequence as ONNX graphs), the other
Triton (simple and simple_sequence as the same graphs in the Python backend, and the decoupled repeat_int32).
The shared-memory examples need a server holding their regions; what the mesh says instead is checked against
what a Triton without that kind of memory says. The model-control example unloads "simple": it runs last.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient import utils
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from meshnode.local.etcd import EtcdProcess
from meshnode.local.triton import TritonProcess
from tests.integration.triton_examples_support import (
    THROUGH,
    WAIT_S,
    Mesh,
    by_request_id,
    check_int_contents,
    check_sequences,
    check_sum_and_difference,
    explicit_request,
    infer_simple,
    ints,
    raw_outputs,
    running_mesh,
    sequence_ids,
    sequence_requests,
    simple_inputs,
    simple_outputs,
    write_onnx_examples,
    write_triton_examples,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def onnx_mesh(etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with running_mesh(etcd, write_onnx_examples(tmp_path_factory.mktemp("examples-onnx")), None) as started:
        yield started


@pytest.fixture(scope="module")
def triton_mesh(etcd: EtcdProcess, tritons: Callable[[Path], TritonProcess],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with running_mesh(etcd, write_triton_examples(tmp_path_factory.mktemp("examples-triton")), tritons) as started:
        yield started


@pytest.fixture(params=["onnx", "triton"])
def mesh(request: pytest.FixtureRequest) -> Mesh:
    """Either runtime's mesh; function-scoped, so pytest keeps the tests in file order (model control last)."""
    chosen: Mesh = request.getfixturevalue(f"{request.param}_mesh")
    return chosen


# simple_grpc_infer_client.py
@pytest.mark.parametrize("through", THROUGH)
def test_infer_client(mesh: Mesh, through: str) -> None:
    with grpcclient.InferenceServerClient(url=mesh.target(through)) as client:
        inputs, input0, input1 = simple_inputs(grpcclient)
        results = client.infer(model_name="simple", inputs=inputs, outputs=simple_outputs(grpcclient),
                               client_timeout=None, headers={"test": "1"}, compression_algorithm=None)
        assert len(client.get_inference_statistics(model_name="simple").model_stats) == 1
        check_sum_and_difference(input0, input1, results)
        check_sum_and_difference(input0, input1, client.infer(model_name="simple", inputs=inputs, outputs=None))


# simple_grpc_async_infer_client.py (it polls its list once a second; a queue waits for the same answer)
@pytest.mark.parametrize("through", THROUGH)
def test_async_infer_client(mesh: Mesh, through: str) -> None:
    answers: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(url=mesh.target(through)) as client:
        inputs, input0, input1 = simple_inputs(grpcclient)
        client.async_infer(model_name="simple", inputs=inputs, outputs=simple_outputs(grpcclient),
                           callback=lambda result, error: answers.put(error or result), client_timeout=None)
        answer = answers.get(timeout=WAIT_S)
    assert not isinstance(answer, InferenceServerException), answer
    check_sum_and_difference(input0, input1, answer)


# simple_grpc_aio_infer_client.py
@pytest.mark.parametrize("through", THROUGH)
def test_aio_infer_client(mesh: Mesh, through: str) -> None:
    async def main() -> None:
        async with aioclient.InferenceServerClient(url=mesh.target(through)) as client:
            inputs, input0, input1 = simple_inputs(aioclient)
            results = await client.infer(model_name="simple", inputs=inputs, outputs=simple_outputs(aioclient),
                                         client_timeout=None, headers={"test": "1"}, compression_algorithm=None)
            statistics = await client.get_inference_statistics(model_name="simple")
            assert len(statistics.model_stats) == 1
            check_sum_and_difference(input0, input1, results)
            both = await asyncio.gather(client.infer(model_name="simple", inputs=inputs, outputs=None),
                                        client.infer(model_name="simple", inputs=inputs, outputs=None))
            for result in both:
                check_sum_and_difference(input0, input1, result)

    asyncio.run(main())


# simple_grpc_keepalive_client.py
@pytest.mark.parametrize("through", THROUGH)
def test_keepalive_client(mesh: Mesh, through: str) -> None:
    options = grpcclient.KeepAliveOptions(keepalive_time_ms=2**31 - 1, keepalive_timeout_ms=20000,
                                          keepalive_permit_without_calls=False, http2_max_pings_without_data=2)
    with grpcclient.InferenceServerClient(url=mesh.target(through), keepalive_options=options) as client:
        infer_simple(client)


# simple_grpc_custom_args_client.py
@pytest.mark.parametrize("through", THROUGH)
def test_custom_args_client(mesh: Mesh, through: str) -> None:
    channel_args = [("grpc.max_send_message_length", 1024 * 1024), ("grpc.max_receive_message_length", 1024 * 1024),
                    ("grpc.keepalive_time_ms", 2**31 - 1), ("grpc.keepalive_timeout_ms", 20000),
                    ("grpc.keepalive_permit_without_calls", False), ("grpc.http2.max_pings_without_data", 2),
                    ("grpc.dns_enable_srv_queries", 1)]
    with grpcclient.InferenceServerClient(url=mesh.target(through), channel_args=channel_args) as client:
        infer_simple(client)


# simple_grpc_health_metadata.py
@pytest.mark.parametrize("through", THROUGH)
def test_health_metadata(mesh: Mesh, through: str) -> None:
    with grpcclient.InferenceServerClient(url=mesh.target(through)) as client:
        assert client.is_server_live(headers={"test": "1", "dummy": "2"})
        assert client.is_server_ready()
        assert client.is_model_ready("simple")
        # The example's one check the mesh answers otherwise, on purpose: a server names itself (its version is
        # meshserve's, which a client gating on Triton's version must not read as Triton's).
        assert client.get_server_metadata().name == "meshserve"
        assert client.get_model_metadata("simple", headers={"test": "1", "dummy": "2"}).name == "simple"
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_metadata("wrong_model_name")
        assert "Request for unknown model" in (caught.value.message() or "")
        assert client.get_model_config("simple").config.name == "simple"


def explicit_then_refused(target: str, model: str, datatype: str, dtype: type[np.generic],
                          spoil: Callable[[Any], None]) -> str:
    """The int examples' two calls: contents answered as raw outputs, then the request `spoil` made refused."""
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = explicit_request(model, datatype, ints)
        check_int_contents(raw_outputs(stub.ModelInfer(request, timeout=WAIT_S),
                                       lambda raw: np.frombuffer(raw, dtype)))
        spoil(request)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=WAIT_S)
    return str(caught.value)


# grpc_explicit_int_content_client.py
@pytest.mark.parametrize("through", THROUGH)
def test_explicit_int_content_client(mesh: Mesh, through: str) -> None:
    def raw_beside_contents(request: Any) -> None:
        request.raw_input_contents.extend([np.array(list(range(8))).tobytes()])
        request.inputs[0].contents.int_contents[:] = list(range(8, 16))

    refused = explicit_then_refused(mesh.target(through), "simple", "INT32", np.int32, raw_beside_contents)
    assert ("contents field must not be specified when using raw_input_contents for 'INPUT0' for model 'simple'"
            in refused)


# grpc_explicit_int8_content_client.py
@pytest.mark.parametrize("through", THROUGH)
def test_explicit_int8_content_client(onnx_mesh: Mesh, through: str) -> None:
    def no_version(request: Any) -> None:
        request.model_version = "wrong_specification"

    refused = explicit_then_refused(onnx_mesh.target(through), "simple_int8", "INT8", np.int8, no_version)
    assert "failed to get model version from specified version string 'wrong_specification'" in refused


# grpc_explicit_byte_content_client.py
@pytest.mark.parametrize("through", THROUGH)
def test_explicit_byte_content_client(onnx_mesh: Mesh, through: str) -> None:
    def strings(tensor: Any, index: int) -> None:
        tensor.contents.bytes_contents.extend([str(i if index == 0 else 1).encode() for i in range(16)])

    with grpc.insecure_channel(onnx_mesh.target(through)) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            explicit_request("simple_string", "BYTES", strings), timeout=WAIT_S)
    sums, differences = raw_outputs(response, utils.deserialize_bytes_tensor)
    for i in range(16):
        assert i + 1 == int(sums[0][i]) and i - 1 == int(differences[0][i])


# simple_grpc_string_infer_client.py
@pytest.mark.parametrize("through", THROUGH)
def test_string_infer_client(onnx_mesh: Mesh, through: str) -> None:
    with grpcclient.InferenceServerClient(url=onnx_mesh.target(through)) as client:
        in0 = np.expand_dims(np.arange(16, dtype=np.int32), axis=0)
        in1 = np.ones((1, 16), np.int32)
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "BYTES"), grpcclient.InferInput("INPUT1", [1, 16], "BYTES")]
        for tensor, values in zip(inputs, (in0, in1), strict=True):
            tensor.set_data_from_numpy(np.array([str(x).encode("utf-8") for x in values.reshape(16)],
                                                dtype=np.object_).reshape(values.shape))
        results = client.infer(model_name="simple_string", inputs=inputs, outputs=simple_outputs(grpcclient))
        output0, output1 = results.as_numpy("OUTPUT0"), results.as_numpy("OUTPUT1")
        assert output0 is not None and output1 is not None
        for i in range(16):
            assert (in0 + in1)[0][i] == int(output0[0][i]) and (in0 - in1)[0][i] == int(output1[0][i])
        nulls = np.array([b"he\x00llo" for _ in range(16)], dtype=np.object_).reshape([1, 16])
        blobs = np.array([b"\x00\x01\x02\x03" for _ in range(16)], dtype=np.bytes_).reshape([1, 16])
        for data in (nulls, blobs):
            tensor = grpcclient.InferInput("INPUT0", list(data.shape), "BYTES")
            tensor.set_data_from_numpy(data)
            output = client.infer(model_name="simple_identity", inputs=[tensor],
                                  outputs=[grpcclient.InferRequestedOutput("OUTPUT0")]).as_numpy("OUTPUT0")
            assert output is not None
            if data.dtype == np.object_:
                assert np.array_equal(data, output), output
            else:
                assert np.array_equal(data, np.char.encode(output.astype(str))), output


# simple_grpc_sequence_sync_infer_client.py
@pytest.mark.parametrize("through", THROUGH)
def test_sequence_sync_infer_client(mesh: Mesh, through: str) -> None:
    ids = sequence_ids()
    answers: dict[int | str, list[int]] = {}
    with grpcclient.InferenceServerClient(url=mesh.target(through)) as client:
        for request in sequence_requests(grpcclient, ids):
            del request["request_id"]  # this example sends none
            result = client.infer(**request)
            answers.setdefault(request["sequence_id"], []).append(int(result.as_numpy("OUTPUT")[0][0]))
    check_sequences(ids, answers)


# simple_grpc_sequence_stream_infer_client.py
@pytest.mark.parametrize("through", THROUGH)
def test_sequence_stream_infer_client(mesh: Mesh, through: str) -> None:
    ids = sequence_ids()
    answers: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(url=mesh.target(through)) as client:
        client.start_stream(callback=lambda result, error: answers.put(error or result), stream_timeout=None)
        requests = list(sequence_requests(grpcclient, ids))
        for request in requests:
            client.async_stream_infer(**request)
        received = [answers.get(timeout=WAIT_S) for _ in requests]
    check_sequences(ids, by_request_id(ids, received))


# simple_grpc_aio_sequence_stream_infer_client.py
@pytest.mark.parametrize("through", THROUGH)
def test_aio_sequence_stream_infer_client(mesh: Mesh, through: str) -> None:
    ids = sequence_ids()

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for request in sequence_requests(aioclient, ids):
            yield request

    async def main() -> list[Any]:
        async with aioclient.InferenceServerClient(url=mesh.target(through)) as client:
            return [error or result async for result, error in
                    client.stream_infer(inputs_iterator=requests(), stream_timeout=None)]

    check_sequences(ids, by_request_id(ids, asyncio.run(asyncio.wait_for(main(), WAIT_S))))


# simple_grpc_custom_repeat.py, with 20 ms where it waits 1 s (before the first response and between responses)
@pytest.mark.parametrize("through", THROUGH)
def test_custom_repeat(triton_mesh: Mesh, through: str) -> None:
    repeat_count, data_offset, delay_ms, wait_ms = 10, 100, 20, 20
    inputs = [grpcclient.InferInput("IN", [repeat_count], "INT32"),
              grpcclient.InferInput("DELAY", [repeat_count], "UINT32"), grpcclient.InferInput("WAIT", [1], "UINT32")]
    inputs[0].set_data_from_numpy(np.arange(data_offset, data_offset + repeat_count, dtype=np.int32))
    inputs[1].set_data_from_numpy(np.ones([repeat_count], np.uint32) * delay_ms)
    inputs[2].set_data_from_numpy(np.array([wait_ms], np.uint32))
    answers: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(url=triton_mesh.target(through)) as client:
        client.start_stream(callback=partial(lambda box, result, error: box.put(error or result), answers))
        client.async_stream_infer(model_name="repeat_int32", inputs=inputs,
                                  outputs=[grpcclient.InferRequestedOutput("OUT")])
        received = [answers.get(timeout=WAIT_S) for _ in range(repeat_count)]
    for expected, answer in enumerate(received, data_offset):
        assert not isinstance(answer, InferenceServerException), answer
        output = answer.as_numpy("OUT")
        assert len(output) == 1 and output[0] == expected


# simple_grpc_cudashm_client.py: its first calls; the mesh has no CUDA shared memory, and says so on register
@pytest.mark.parametrize("through", THROUGH)
def test_cudashm_client_is_told_the_mesh_has_no_cuda_shared_memory(triton_mesh: Mesh, through: str) -> None:
    with grpcclient.InferenceServerClient(url=triton_mesh.target(through)) as client:
        client.unregister_cuda_shared_memory()
        assert len(client.get_cuda_shared_memory_status().regions) == 0
        with pytest.raises(InferenceServerException) as caught:
            client.register_cuda_shared_memory("output_data", b"aGFuZGxl", 0, 64)
    assert caught.value.status() == str(grpc.StatusCode.UNIMPLEMENTED)
    assert "CUDA shared memory" in (caught.value.message() or "")


def _expect_load_failure(load: Callable[[], None]) -> None:
    with pytest.raises(InferenceServerException) as caught:
        load()
    assert "failed to load" in (caught.value.message() or ""), caught.value.message()


# simple_grpc_model_control.py; last in the module: it leaves "simple" unloaded
@pytest.mark.parametrize("through", THROUGH)
def test_model_control(mesh: Mesh, through: str) -> None:
    with grpcclient.InferenceServerClient(url=mesh.target(through)) as client:
        assert len(client.get_model_repository_index().models) == len(mesh.models)  # the example's repo has 8
        client.load_model("simple")
        assert client.is_model_ready("simple")
        _expect_load_failure(lambda: client.load_model("simple", config='"parameters": {"config": {{"max_batch_size": '
                                                                         '"16"}}}'))
        client.load_model("simple", config='{"max_batch_size":"16"}')
        assert client.get_model_config("simple").config.max_batch_size == 16
        client.unload_model("simple")
        assert not client.is_model_ready("simple")
        with pytest.raises(InferenceServerException) as caught:
            client.load_model("simple", config="{}", files={"file:" + "A" * 256: b"a"})
        # The example looks for these words in status(), which tritonclient fills with the status code.
        assert "Invalid file path" in (caught.value.message() or ""), caught.value.message()
        assert client.is_server_live()
        _expect_load_failure(lambda: client.load_model("wrong_model_name"))
