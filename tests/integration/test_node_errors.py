"""Bad input gets the status a Triton client expects, and the node keeps serving."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from deploy.local.models import mlp_reference
from meshnode.local.node import NodeProcess
from meshnode.net import transport
from meshpb import pb
from tests.integration.helpers import metric


def raw_request(model: str, shape: list[int], raw: bytes, datatype: str = "FP32",
                name: str = "INPUT0") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)],
        raw_input_contents=[raw],
    )


async def call(node: NodeProcess, request: pb.ModelInferRequest) -> grpc.aio.AioRpcError:
    async with transport.create_channel(node.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await transport.InferenceStub(channel).ModelInfer(request, timeout=30)
    return err.value


def assert_still_serving(client: grpcclient.InferenceServerClient, model_repo: Path) -> None:
    x = np.ones((1, 16), np.float32)
    inp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("mlp", [inp]).as_numpy("OUTPUT0"),
                               mlp_reference(model_repo / "mlp", x, version=2), rtol=1e-4, atol=1e-5)


def test_unknown_model_gets_tritons_not_found(client: grpcclient.InferenceServerClient) -> None:
    inp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("nope", [inp])
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "Request for unknown model: 'nope' is not found" in err.value.message()
    assert not client.is_model_ready("nope")


@pytest.mark.parametrize(("request_", "fragment"), [
    (raw_request("mlp", [1, 15], b"\0" * 60), "INPUT0"),  # wrong shape
    (raw_request("mlp", [1, 16], b"\0" * 60), "INPUT0"),  # byte size
    (raw_request("mlp", [1, 16], b"\0" * 64, datatype="INT32"), "INPUT0"),  # datatype
    (raw_request("mlp", [1, 16], b"\0" * 64, name="WRONG"), "WRONG"),  # unknown input
    (pb.ModelInferRequest(model_name="simple", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="INPUT0", datatype="FP32", shape=[1, 16])], raw_input_contents=[b"\0" * 64]), "INPUT1"),  # missing
], ids=["shape", "byte-size", "datatype", "extra-input", "missing-input"])
async def test_bad_input_is_invalid_argument_naming_the_input(
    node: NodeProcess, request_: pb.ModelInferRequest, fragment: str
) -> None:
    error = await call(node, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert fragment in (error.details() or "")


async def test_garbage_bytes_do_not_hurt_the_node(node: NodeProcess, client: grpcclient.InferenceServerClient,
                                                  model_repo: Path) -> None:
    rng = np.random.default_rng(7)
    async with transport.create_channel(node.target) as channel:
        raw_call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for size in (1, 7, 100, 5000):
            with pytest.raises(grpc.aio.AioRpcError):
                await raw_call(rng.bytes(size), timeout=10)
    assert client.is_server_live()
    assert_still_serving(client, model_repo)


async def test_corrupt_model_fails_clearly_once_and_the_node_keeps_serving(
    node: NodeProcess, client: grpcclient.InferenceServerClient, model_repo: Path
) -> None:
    failures_before = metric(node, "modelmesh_loadmodel_failure_total")
    first = await call(node, raw_request("broken", [1, 16], b"\0" * 64))
    assert "broken" in (first.details() or "")
    second = await call(node, raw_request("broken", [1, 16], b"\0" * 64))
    assert second.code() == grpc.StatusCode.UNAVAILABLE
    # The cause, from this node's backoff or from the failure in the model record, whichever is first.
    assert "broken" in (second.details() or "") and "failed to load" in (second.details() or "")
    # The second request hit the failure backoff: no second load attempt.
    assert metric(node, "modelmesh_loadmodel_failure_total") == failures_before + 1
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["broken"].state == "UNAVAILABLE"
    assert_still_serving(client, model_repo)
