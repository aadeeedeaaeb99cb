"""The management service and its command line against two real node processes and a real etcd."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from deploy.local.models import write_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from meshnode.net import transport
from meshpb import mpb
from tests.integration.conftest import start_nodes, write_broken
from tests.integration.helpers import manage, wait_until
from tests.integration.test_aliases import X

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mgmt-repo")
    write_mlp(root, "served", approx_bytes=100_000)
    write_broken(root)
    return root


@pytest.fixture(scope="module")
def mesh(etcd: EtcdProcess, repo: Path) -> Iterator[list[NodeProcess]]:
    nodes = start_nodes(etcd, repo, 2, capacity="64MiB", extra_args=["--no-proactive-loads"])
    yield nodes
    for node in nodes:
        node.stop()


def cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshnode", *args, "--target", node.target],
                          capture_output=True, text=True, timeout=60)


async def test_status_shows_copies_size_and_failures_from_any_node(mesh: list[NodeProcess]) -> None:
    with grpcclient.InferenceServerClient(mesh[0].target) as client:
        inputs = [grpcclient.InferInput("INPUT0", list(X.shape), "FP32").set_data_from_numpy(X)]
        client.infer("served", inputs)
        with pytest.raises(InferenceServerException, match="broken"):
            client.infer("broken", inputs)
    served = await manage(mesh[1].target, "GetModelStatus", mpb.GetModelStatusRequest(name="served"))
    assert isinstance(served, mpb.ModelStatus)
    assert served.state == "READY" and [c.state for c in served.copies] == ["loaded"]
    assert served.size_bytes >= 100_000 and served.storage_uri.endswith("served") and served.min_copies == 1
    broken = await manage(mesh[1].target, "GetModelStatus", mpb.GetModelStatusRequest(name="broken"))
    assert isinstance(broken, mpb.ModelStatus)
    assert broken.state == "FAILED" and broken.failures and "broken" in broken.failures[0].message


async def test_listing_pages_through_models_in_name_order_with_a_prefix(
        mesh: list[NodeProcess], repo: Path) -> None:
    for i in range(23):
        await manage(mesh[i % 2].target, "RegisterModel", mpb.RegisterModelRequest(
            name=f"page-{i:02d}", storage_uri=str(repo / "served"), lazy=True))
    seen: list[str] = []
    request = mpb.ListModelsRequest(prefix="page-", page_size=10)
    pages = 0
    while True:
        listed = await manage(mesh[0].target, "ListModels", request)
        assert isinstance(listed, mpb.ListModelsResponse)
        seen += [m.name for m in listed.models]
        pages += 1
        if not listed.next_page_token:
            break
        request.page_token = listed.next_page_token
    assert pages == 3 and seen == [f"page-{i:02d}" for i in range(23)]
    assert all(m.state == "REGISTERED" for m in listed.models)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await manage(mesh[0].target, "ListModels", mpb.ListModelsRequest(prefix="page-", page_token="other"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_nodes_are_listed_with_capacity_use_and_cache_age(mesh: list[NodeProcess]) -> None:
    async with transport.create_channel(mesh[0].target) as channel:
        listed = await transport.ManagementStub(channel).ListNodes(mpb.ListNodesRequest(), timeout=10)
    assert [n.instance_id for n in listed.nodes] == ["n0", "n1"]
    assert all(n.capacity_bytes == 64 * 2**20 and not n.shutting_down for n in listed.nodes)
    assert {n.endpoint for n in listed.nodes} == {node.target for node in mesh}


@pytest.mark.parametrize(("method", "request_", "code"), [
    ("RegisterModel", mpb.RegisterModelRequest(name="x"), grpc.StatusCode.INVALID_ARGUMENT),
    ("RegisterModel", mpb.RegisterModelRequest(name="x", storage_uri="/no/such/dir"), grpc.StatusCode.INVALID_ARGUMENT),
    ("RegisterModel", mpb.RegisterModelRequest(name="a/b", storage_uri="/tmp"), grpc.StatusCode.INVALID_ARGUMENT),
    ("RegisterModel", mpb.RegisterModelRequest(name="x", storage_uri="/tmp", runtime="tpu"),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("GetModelStatus", mpb.GetModelStatusRequest(name="nope"), grpc.StatusCode.NOT_FOUND),
    ("UnregisterModel", mpb.UnregisterModelRequest(name="nope"), grpc.StatusCode.NOT_FOUND),
])
async def test_bad_requests_get_a_clear_status(mesh: list[NodeProcess], method: str, request_: object,
                                               code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await manage(mesh[0].target, method, request_)
    assert raised.value.code() == code and raised.value.details()


def test_command_line_models_aliases_and_nodes(mesh: list[NodeProcess], tmp_path: Path) -> None:
    extra = write_mlp(tmp_path / "extra", "added", approx_bytes=50_000)
    node = mesh[1]
    registered = cli(node, "models", "register", "added", str(extra), "--lazy", "--pinned", "--json")
    assert registered.returncode == 0, registered.stderr
    assert json.loads(registered.stdout)["pinned"] is True
    status = json.loads(cli(node, "models", "status", "added", "--json").stdout)
    assert status["state"] == "REGISTERED" and status["copies"] == []
    assert "added: REGISTERED" in cli(node, "models", "status", "added").stdout
    table = cli(node, "models", "list", "--prefix", "add").stdout
    assert table.splitlines()[0].split() == ["NAME", "STATE", "COPIES", "SIZE", "LAST_USED", "ALIASES"]
    assert "added" in table and "served" not in table

    set_alias = cli(node, "aliases", "set", "front", "added", "--auto-delete")
    assert set_alias.returncode == 0, set_alias.stderr
    assert json.loads(cli(node, "aliases", "get", "front", "--json").stdout)["model"] == "added"
    listed = cli(mesh[0], "aliases", "list").stdout
    assert listed.splitlines()[0].split()[:3] == ["ALIAS", "MODEL", "AUTO_DELETE"] and "front" in listed
    refused = cli(node, "models", "unregister", "added")
    assert refused.returncode == 1 and "FAILED_PRECONDITION" in refused.stderr and "front" in refused.stderr
    assert cli(node, "aliases", "delete", "front").returncode == 0
    assert "(no aliases)" in cli(node, "aliases", "list").stdout

    nodes = cli(node, "nodes")
    assert nodes.returncode == 0 and nodes.stdout.splitlines()[0].split()[:3] == ["INSTANCE", "ENDPOINT", "USED"]
    assert json.loads(cli(node, "nodes", "--json").stdout)[1]["instance_id"] == "n1"
    missing = cli(node, "models", "status", "nope")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "not registered" in missing.stderr


async def test_grpc_health_says_serving_then_not_serving_while_the_node_drains(
        etcd: EtcdProcess, repo: Path) -> None:
    node = start_nodes(etcd, repo, 1)[0]
    try:
        async with transport.create_channel(node.target) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            for service in ("", "inference.GRPCInferenceService", "meshserve.management.v1.Management"):
                answer = await check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            node.process.send_signal(signal.SIGTERM)

            async def not_serving() -> bool:
                answer = await check(health_pb2.HealthCheckRequest(), timeout=10)
                return answer.status == health_pb2.HealthCheckResponse.NOT_SERVING

            await wait_until(not_serving, 5, "the draining node's health to say NOT_SERVING")
    finally:
        node.stop()
