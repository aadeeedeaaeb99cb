"""The rest of Triton's gRPC protocol through a two-node mesh, with tritonclient: ModelConfig, ModelStatistics
(mesh-wide and per node), shared memory, trace and log settings, and server reflection."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tritonclient.utils import InferenceServerException

from deploy.local.models import write_add_sub, write_mlp
from deploy.local.triton_models import write_python_onnx_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.mesh import LocalMesh
from meshnode.local.node import NodeProcess
from meshnode.net import transport
from meshpb import mpb
from tests.integration.conftest import start_nodes

SPELLED_CONFIG = """
name: "spelled"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("extras-repo")
    write_add_sub(root, "simple", width=4)
    write_add_sub(root, "counted", width=4)
    write_mlp(root, "mlp", approx_bytes=20_000)
    (root / "mlp" / "config.pbtxt").write_text('version_policy: { all { } }\n')
    write_add_sub(root, "spelled", width=4)
    (root / "spelled" / "config.pbtxt").write_text(SPELLED_CONFIG)
    return root


@pytest.fixture(scope="module")
def nodes(etcd: EtcdProcess, repo: Path) -> Iterator[list[NodeProcess]]:
    started = start_nodes(etcd, repo, 2)
    try:
        yield started
    finally:
        for node in started:
            node.stop()


def _infer(target: str, name: str) -> None:
    with grpcclient.InferenceServerClient(target) as client:
        inputs = [grpcclient.InferInput(n, [1, 4], "FP32") for n in ("INPUT0", "INPUT1")]
        for tensor in inputs:
            tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        client.infer(name, inputs)


def test_an_onnx_models_config_is_derived_from_its_graph_through_any_node(nodes: list[NodeProcess]) -> None:
    for node in nodes:
        with grpcclient.InferenceServerClient(node.target) as client:
            config = client.get_model_config("simple", as_json=True)["config"]
        assert config["name"] == "simple" and config["platform"] == "onnxruntime_onnx"
        assert config["max_batch_size"] == 4  # the first dimension is dynamic: Triton's default batch bound
        assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
            ("INPUT0", "TYPE_FP32", ["4"]), ("INPUT1", "TYPE_FP32", ["4"])]
        assert [t["name"] for t in config["output"]] == ["OUTPUT0", "OUTPUT1"]


def test_a_config_pbtxt_is_merged_over_the_graph(nodes: list[NodeProcess]) -> None:
    with grpcclient.InferenceServerClient(nodes[1].target) as client:
        config = client.get_model_config("mlp").config
    assert config.version_policy.HasField("all")
    assert config.platform == "onnxruntime_onnx" and [t.name for t in config.input] == ["INPUT0"]


async def test_a_config_that_spells_out_its_tensors_answers_without_a_load(nodes: list[NodeProcess]) -> None:
    with grpcclient.InferenceServerClient(nodes[0].target) as client:
        config = client.get_model_config("spelled").config
    assert config.max_batch_size == 8 and [list(t.dims) for t in config.input] == [[4], [4]]
    channel = transport.create_channel(nodes[0].target)
    try:
        status = await transport.ManagementStub(channel).GetModelStatus(mpb.GetModelStatusRequest(name="spelled"))
    finally:
        await channel.close()
    assert not status.copies and status.state == "REGISTERED"


def test_an_unknown_models_config_and_statistics_are_not_found(nodes: list[NodeProcess]) -> None:
    with grpcclient.InferenceServerClient(nodes[0].target) as client:
        for call in (client.get_model_config, client.get_inference_statistics):
            with pytest.raises(InferenceServerException) as raised:
                call("nope")
            assert raised.value.status() == "StatusCode.NOT_FOUND" and "'nope'" in raised.value.message()


def test_statistics_count_every_request_once_through_every_node(nodes: list[NodeProcess]) -> None:
    sent = {nodes[0].target: 5, nodes[1].target: 3}
    for target, count in sent.items():
        for _ in range(count):
            _infer(target, "counted")
    for node in nodes:
        with grpcclient.InferenceServerClient(node.target) as client:
            (stats,) = client.get_inference_statistics("counted").model_stats
        assert stats.name == "counted" and stats.version == "1"
        assert stats.inference_stats.success.count == 8 and stats.execution_count == 8
        assert stats.inference_count == 8 and stats.inference_stats.fail.count == 0
        assert stats.inference_stats.compute_infer.count == 8 and stats.last_inference > 0
    # One node's share: together the shares are the mesh's counts.
    shares = []
    for node in nodes:
        with grpcclient.InferenceServerClient(node.target) as client:
            report = client.get_inference_statistics("counted", headers={"meshserve-scope": "node"}).model_stats
        shares.append(sum(s.inference_stats.success.count for s in report))
    assert sum(shares) == 8


def test_statistics_of_every_model_and_of_a_model_that_never_ran(nodes: list[NodeProcess]) -> None:
    _infer(nodes[0].target, "simple")
    with grpcclient.InferenceServerClient(nodes[1].target) as client:
        every = client.get_inference_statistics().model_stats
        (idle,) = client.get_inference_statistics("spelled").model_stats
    assert "simple" in {s.name for s in every}
    assert idle.name == "spelled" and idle.inference_stats.success.count == 0


def test_shared_memory_answers_as_a_server_without_it(nodes: list[NodeProcess]) -> None:
    with grpcclient.InferenceServerClient(nodes[0].target) as client:
        assert not client.get_system_shared_memory_status().regions
        assert not client.get_cuda_shared_memory_status().regions
        client.unregister_system_shared_memory()
        client.unregister_cuda_shared_memory()
        with pytest.raises(InferenceServerException) as raised:
            client.register_system_shared_memory("region", "/key", 64)
        assert raised.value.status() == "StatusCode.UNIMPLEMENTED" and "send its tensors" in raised.value.message()
        with pytest.raises(InferenceServerException) as raised:
            client.register_cuda_shared_memory("region", b"aGFuZGxl", 0, 64)
        assert raised.value.status() == "StatusCode.UNIMPLEMENTED"


def test_log_levels_change_and_fixed_settings_say_so(nodes: list[NodeProcess]) -> None:
    with grpcclient.InferenceServerClient(nodes[1].target) as client:
        before = client.get_log_settings().settings
        assert before["log_info"].bool_param and before["log_format"].string_param == "text"
        assert client.update_log_settings({"log_verbose_level": 1}).settings["log_verbose_level"].uint32_param == 1
        quiet = client.update_log_settings({"log_verbose_level": 0, "log_info": False}).settings
        assert not quiet["log_info"].bool_param and quiet["log_warning"].bool_param
        client.update_log_settings({"log_info": True})
        with pytest.raises(InferenceServerException) as raised:
            client.update_log_settings({"log_file": "/tmp/elsewhere.log"})
        assert raised.value.status() == "StatusCode.UNIMPLEMENTED" and "log_file" in raised.value.message()


def test_trace_settings_are_read_and_a_change_is_refused_naming_it(nodes: list[NodeProcess]) -> None:
    with grpcclient.InferenceServerClient(nodes[0].target) as client:
        settings = client.get_trace_settings().settings
        assert list(settings["trace_level"].value) == ["OFF"]
        with pytest.raises(InferenceServerException) as raised:
            client.update_trace_settings(settings={"trace_rate": "10"})
        assert raised.value.status() == "StatusCode.UNIMPLEMENTED" and "trace_rate" in raised.value.message()


def test_reflection_lists_and_describes_every_service(nodes: list[NodeProcess]) -> None:
    with grpc.insecure_channel(nodes[0].target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health", transport.MANAGEMENT_SERVICE} <= services
        inference = DescriptorPool(database).FindServiceByName("inference.GRPCInferenceService")
        assert {"ModelInfer", "ModelConfig", "ModelStatistics", "LogSettings"} <= {m.name for m in inference.methods}


@pytest.mark.timeout(180)
def test_a_triton_models_config_is_triton_s_own(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_python_onnx_mlp(repo, "tm", approx_bytes=20_000)
    with LocalMesh.start(nodes=1, model_repository=repo, capacity="1GiB", log_dir=tmp_path / "logs", triton=True,
                         extra_args=["--no-proactive-loads"]) as mesh, \
            grpcclient.InferenceServerClient(mesh.targets()[0]) as client:
        config = client.get_model_config("tm", client_timeout=60).config
    # Triton's own: the versions the node asked it to hold (the file has no version_policy), and what only
    # Triton's auto-complete fills in (the instance group's name).
    assert config.name == "tm" and config.backend == "python" and list(config.version_policy.specific.versions) == [1]
    assert config.instance_group[0].name
    assert [t.name for t in config.input] == ["INPUT0"] and [t.name for t in config.output] == ["OUTPUT0"]
