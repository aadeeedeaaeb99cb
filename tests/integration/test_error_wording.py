"""Errors as Triton words them, read by the client the same from the node holding the copy and from one that
forwards: the failing node rides in trailing metadata (`meshserve-node`), never in the message; no server paths."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from deploy.local.models import write_add_sub
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from meshnode.net import transport
from meshpb import pb
from router.errors import NODE_KEY
from tests.integration.conftest import start_node

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def mesh(etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """n0 holds 'simple'; n1 has no room for any model, so it always forwards."""
    repo = tmp_path_factory.mktemp("repo")
    write_add_sub(repo, "simple")
    prefix = f"words-{uuid.uuid4().hex[:8]}"
    holder = start_node(etcd, repo, prefix=prefix, extra_args=["--instance-id", "n0"])
    try:
        forwarder = start_node(etcd, repo, capacity="1KiB", prefix=prefix, extra_args=["--instance-id", "n1"])
        try:
            with grpcclient.InferenceServerClient(holder.target) as client:
                client.load_model("simple")
            yield holder, forwarder
        finally:
            forwarder.stop()
    finally:
        holder.stop()


def simple_request(version: str = "") -> pb.ModelInferRequest:
    """Triton's explicit-contents example: INPUT0 partly raw, partly contents (which Triton refuses)."""
    data = np.arange(16, dtype=np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor
    request = pb.ModelInferRequest(model_name="simple", model_version=version, inputs=[
        tensor(name="INPUT0", datatype="FP32", shape=[1, 16]), tensor(name="INPUT1", datatype="FP32", shape=[1, 16])])
    request.raw_input_contents.extend([data[:8].tobytes()])
    request.inputs[0].contents.fp32_contents[:] = data[8:]
    return request


async def refused(node: NodeProcess, request: pb.ModelInferRequest) -> grpc.aio.AioRpcError:
    async with transport.create_channel(node.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await transport.InferenceStub(channel).ModelInfer(request, timeout=30)
    return caught.value


def failed_node(error: grpc.aio.AioRpcError) -> str | None:
    found = dict(error.trailing_metadata() or ()).get(NODE_KEY)
    return None if found is None else str(found)


async def test_contents_beside_raw_contents_reads_as_triton_from_either_node(
    mesh: tuple[NodeProcess, NodeProcess],
) -> None:
    holder, forwarder = mesh
    local, forwarded = await refused(holder, simple_request()), await refused(forwarder, simple_request())
    expected = "contents field must not be specified when using raw_input_contents for 'INPUT0' for model 'simple'"
    for error in (local, forwarded):
        assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, expected)
    assert failed_node(local) == "n0" and failed_node(forwarded) == "n0"  # the copy's node refused it both times


async def test_a_version_string_that_is_no_version_is_tritons_invalid_argument(
    mesh: tuple[NodeProcess, NodeProcess],
) -> None:
    for node in mesh:
        error = await refused(node, simple_request("wrong_specification"))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (error.details() or "").startswith(
            "failed to get model version from specified version string 'wrong_specification'"), error.details()


def test_an_upload_name_too_long_is_invalid_argument_without_the_servers_paths(
    mesh: tuple[NodeProcess, NodeProcess], tmp_path: Path,
) -> None:
    long_path = "1/" + "/".join(["d" * 250] * 20) + "/model.onnx"
    with grpcclient.InferenceServerClient(mesh[1].target) as client, pytest.raises(InferenceServerException) as caught:
        client.load_model("uploaded", config='{"backend": "onnxruntime"}', files={f"file:{long_path}": b"x"})
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value.message()
    message = caught.value.message() or ""
    assert "path is too long" in message and "/tmp" not in message and str(Path.home()) not in message
