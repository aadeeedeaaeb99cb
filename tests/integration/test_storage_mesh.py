"""Three nodes with no shared path: each its own --disk-cache, models only in a real S3-compatible server (moto).

Every model through every node; an upload through one node served by another; a model added to the bucket
appears without a restart; a node restarted with its disk cache reloads without reading an object again; the
store stopped while models are loaded: they keep serving, a model never pulled fails UNAVAILABLE naming the
store, and loads recover once the store is back.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from deploy.local.models import mlp_reference, write_add_sub, write_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from tests.integration.helpers import wait_until_blocking
from tests.integration.s3_server import BUCKET, REGION, MotoS3

pytestmark = pytest.mark.timeout(240)
REPOSITORY = f"s3://{BUCKET}/models"


def model_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@dataclass
class Mesh:
    s3: MotoS3
    nodes: list[NodeProcess]
    args: list[dict[str, object]]
    local: Path  # the models as written, for the expected answers

    def restart(self, i: int) -> None:
        self.nodes[i].stop()
        self.nodes[i] = NodeProcess.start(**self.args[i])  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdProcess) -> Iterator[Mesh]:
    work = tmp_path_factory.mktemp("s3-mesh")
    local = work / "written"
    write_mlp(local, "mlp", approx_bytes=100_000)
    write_add_sub(local, "simple")
    s3 = MotoS3(work, record=True)
    s3.start(authenticate=False)  # the store's own refusals are tested beside the materializer
    nodes: list[NodeProcess] = []
    try:
        for name in ("mlp", "simple"):
            s3.put_files(f"models/{name}", model_files(local / name))
        prefix = f"s3mesh-{uuid.uuid4().hex[:8]}"
        env = {"AWS_ACCESS_KEY_ID": "any", "AWS_SECRET_ACCESS_KEY": "any"}
        args: list[dict[str, object]] = [dict(
            etcd=etcd.endpoint, model_repository=REPOSITORY, capacity="256MiB", etcd_prefix=prefix, env=env,
            instance_id=f"n{i}", extra_args=["--disk-cache", str(work / f"disk-{i}"), "--s3-endpoint-url",
                                             s3.endpoint, "--s3-region", REGION, "--repository-poll-interval", "0.5"])
            for i in range(3)]
        nodes.extend(NodeProcess.start(**a) for a in args)  # type: ignore[arg-type]
        yield Mesh(s3, nodes, args, local)
    finally:
        for node in nodes:
            node.stop()
        s3.stop()


def add(client: grpcclient.InferenceServerClient, name: str = "simple", width: int = 16) -> np.ndarray:
    x = np.arange(width, dtype=np.float32).reshape(1, width)
    inputs = [grpcclient.InferInput(f"INPUT{i}", [1, width], "FP32") for i in (0, 1)]
    for tensor in inputs:
        tensor.set_data_from_numpy(x)
    return client.infer(name, inputs, client_timeout=60).as_numpy("OUTPUT0")  # type: ignore[no-any-return]


def served(target: str, name: str) -> bool:
    with grpcclient.InferenceServerClient(target) as client:
        try:
            return bool(np.array_equal(add(client, name), 2 * np.arange(16, dtype=np.float32).reshape(1, 16)))
        except InferenceServerException:
            return False


def test_every_model_through_every_node(mesh: Mesh) -> None:
    wait_until_blocking(lambda: served(mesh.nodes[0].target, "simple"), 30, "the bucket's models registered")
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    for node in mesh.nodes:
        with grpcclient.InferenceServerClient(node.target) as client:
            tensor = grpcclient.InferInput("INPUT0", [2, 16], "FP32")
            tensor.set_data_from_numpy(x)
            np.testing.assert_allclose(client.infer("mlp", [tensor]).as_numpy("OUTPUT0"),
                                       mlp_reference(mesh.local / "mlp", x), rtol=1e-4, atol=1e-5)
            assert served(node.target, "simple")


def test_an_upload_through_one_node_lands_in_the_store_and_another_serves_it(mesh: Mesh, tmp_path: Path) -> None:
    files = model_files(write_add_sub(tmp_path, "uploaded"))
    with grpcclient.InferenceServerClient(mesh.nodes[0].target) as client:
        client.load_model("uploaded", files={f"file:{k}": v for k, v in files.items()})
    keys = {o["Key"] for o in mesh.s3.client().list_objects_v2(Bucket=BUCKET, Prefix="models/uploaded/")["Contents"]}
    assert keys == {f"models/uploaded/{k}" for k in files}
    assert served(mesh.nodes[2].target, "uploaded")


def test_models_register_upload_sends_a_client_machines_files_to_the_store(mesh: Mesh, tmp_path: Path) -> None:
    local = write_add_sub(tmp_path, "from-laptop")  # on this machine only: no node can read this path
    done = subprocess.run([sys.executable, "-m", "meshnode", "models", "register", "from-laptop", str(local),
                           "--upload", "--lazy", "--target", mesh.nodes[1].target], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    listed = mesh.s3.client().list_objects_v2(Bucket=BUCKET, Prefix="models/from-laptop/")["Contents"]
    assert {o["Key"] for o in listed} == {"models/from-laptop/1/model.onnx"}
    assert served(mesh.nodes[0].target, "from-laptop")


def test_a_model_added_to_the_bucket_appears_without_a_restart(mesh: Mesh, tmp_path: Path) -> None:
    mesh.s3.put_files("models/late", model_files(write_add_sub(tmp_path, "late")))
    wait_until_blocking(lambda: served(mesh.nodes[1].target, "late"), 20, "a model added to the bucket served")


def test_a_node_restarted_with_its_disk_cache_reloads_without_reading_an_object(mesh: Mesh) -> None:
    with grpcclient.InferenceServerClient(mesh.nodes[2].target) as client:
        client.load_model("simple")  # a copy on node 2: on its disk now
    mesh.restart(2)
    mesh.s3.clear_requests()
    with grpcclient.InferenceServerClient(mesh.nodes[2].target) as client:
        client.load_model("simple")  # loads here again, from the disk tier
        assert served(mesh.nodes[2].target, "simple")
    assert mesh.s3.object_gets() == []  # listings only: the ETags matched what is on disk
    figures = scrape(mesh.nodes[2])
    assert figures["meshserve_disk_cache_hits_total"] >= 1 and figures["meshserve_storage_pulled_bytes_total"] == 0
    assert figures["meshserve_disk_cache_bytes"] > 0


def test_the_store_stopped_leaves_loaded_models_serving_and_loads_recover_after(mesh: Mesh, tmp_path: Path) -> None:
    mesh.s3.put_files("models/never-pulled", model_files(write_add_sub(tmp_path, "never-pulled")))
    wait_until_blocking(lambda: all(_registered(n.target, "never-pulled") for n in mesh.nodes), 20,
                        "the new model registered")
    for node in mesh.nodes:
        assert served(node.target, "simple")
    mesh.s3.stop()
    try:
        for node in mesh.nodes:
            assert served(node.target, "simple")  # loaded, or on each node's disk: no store needed
        with grpcclient.InferenceServerClient(mesh.nodes[1].target) as client, \
                pytest.raises(InferenceServerException) as error:
            add(client, "never-pulled")
        assert error.value.status() == "StatusCode.UNAVAILABLE"
        assert f"s3://{BUCKET}/models/never-pulled" in (error.value.message() or ""), error.value.message()
    finally:
        mesh.s3.start(authenticate=False)  # an empty store on the same port: the objects are put again
        for name in ("mlp", "simple"):
            mesh.s3.put_files(f"models/{name}", model_files(mesh.local / name))
        mesh.s3.put_files("models/never-pulled", model_files(tmp_path / "never-pulled"))
    # The store came back empty, then filled: the mesh may have followed it through both; either way it serves.
    wait_until_blocking(lambda: served(mesh.nodes[1].target, "never-pulled"), 20, "a load after the store returned")


def scrape(node: NodeProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{node.host}:{node.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def _registered(target: str, name: str) -> bool:
    with grpcclient.InferenceServerClient(target) as client:
        return any(m["name"] == name for m in client.get_model_repository_index(as_json=True).get("models", []))
