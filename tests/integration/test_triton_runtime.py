"""`meshserve node --runtime triton`: real node processes beside real Triton servers, queried with tritonclient.

Python-backend models (the only backend in the Triton that `make triton` installs) load in ~1.4 s each,
so servers and models are shared per module and each test loads as little as it can.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from deploy.local.models import mlp_reference, write_mlp
from deploy.local.triton_models import write_python_add_sub, write_python_onnx_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.mesh import LocalMesh
from meshnode.local.node import NodeProcess
from meshnode.local.triton import TritonProcess
from tests.integration.conftest import start_node
from tests.integration.helpers import metric, wait_until_blocking

pytestmark = pytest.mark.timeout(120)
WIDTH = 16
Start = Callable[[Path], TritonProcess]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Triton's repository and the nodes' alike: these models load in Triton by name."""
    root = tmp_path_factory.mktemp("triton-repo")
    write_python_add_sub(root, "add")
    write_python_add_sub(root, "add2")
    write_python_onnx_mlp(root, "mlp", approx_bytes=200_000)
    write_python_add_sub(root, "slow", delay_s=3.0)
    return root


def start_triton_node(etcd: EtcdProcess, repo: Path, triton: TritonProcess, capacity: str = "1GiB",
                      prefix: str | None = None, extra: list[str] | None = None) -> NodeProcess:
    # No proactive loads: what Triton holds must be what the test asked for.
    args = ["--runtime", "triton", "--triton-url", triton.grpc_target, "--triton-model-repository", str(repo),
            "--no-proactive-loads", *(extra or [])]
    return start_node(etcd, repo, capacity=capacity, prefix=prefix, extra_args=args)


@pytest.fixture(scope="module")
def triton(tritons: Start, repo: Path) -> TritonProcess:
    return tritons(repo)


@pytest.fixture(scope="module")
def node(etcd: EtcdProcess, repo: Path, triton: TritonProcess) -> Iterator[NodeProcess]:
    process = start_triton_node(etcd, repo, triton)
    yield process
    process.stop()


def add_inputs(a: np.ndarray, b: np.ndarray) -> list[grpcclient.InferInput]:
    inputs = []
    for name, value in (("INPUT0", a), ("INPUT1", b)):
        tensor = grpcclient.InferInput(name, list(value.shape), "FP32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def check_add(target: str, model: str = "add") -> None:
    a = np.arange(2 * WIDTH, dtype=np.float32).reshape(2, WIDTH)
    b = np.full((2, WIDTH), 0.5, np.float32)
    with grpcclient.InferenceServerClient(target) as client:
        result = client.infer(model, add_inputs(a, b), client_timeout=30)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def triton_states(triton: TritonProcess) -> dict[str, str]:
    with grpcclient.InferenceServerClient(triton.grpc_target) as client:
        return {m.name: m.state for m in client.get_model_repository_index().models}


def wait_triton_state(triton: TritonProcess, name: str, state: str, timeout_s: float = 10.0) -> None:
    wait_until_blocking(lambda: triton_states(triton).get(name) == state, timeout_s, f"{name} to be {state} on Triton")


def test_the_node_answers_with_tritons_models_and_their_metadata(node: NodeProcess, repo: Path,
                                                                 triton: TritonProcess) -> None:
    check_add(node.target)
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    with grpcclient.InferenceServerClient(node.target) as client:
        tensor = grpcclient.InferInput("INPUT0", [3, 16], "FP32")
        tensor.set_data_from_numpy(x)
        y = client.infer("mlp", [tensor], client_timeout=30).as_numpy("OUTPUT0")
        metadata = client.get_model_metadata("add")
    np.testing.assert_allclose(y, mlp_reference(repo / "mlp", x), rtol=1e-5, atol=1e-6)
    assert metadata.platform == "python"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("INPUT0", "FP32", [-1, WIDTH]), ("INPUT1", "FP32", [-1, WIDTH])]
    assert [t.name for t in metadata.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert triton_states(triton)["add"] == "READY"


def test_a_bad_input_is_invalid_argument_with_tritons_reason(node: NodeProcess) -> None:
    short, right = np.ones((1, WIDTH // 2), np.float32), np.ones((1, WIDTH), np.float32)
    with grpcclient.InferenceServerClient(node.target) as client, pytest.raises(InferenceServerException) as error:
        client.infer("add", add_inputs(short, right), client_timeout=30)
    assert error.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    message = error.value.message() or ""
    assert "unexpected shape for input 'INPUT0' for model 'add'" in message, message
    assert f"Expected [-1,{WIDTH}], got [1,{WIDTH // 2}]" in message, message


def test_the_clients_deadline_bounds_the_call_to_triton_and_the_node_keeps_serving(node: NodeProcess) -> None:
    ones = np.ones((1, WIDTH), np.float32)
    with grpcclient.InferenceServerClient(node.target) as client:
        client.load_model("slow")
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as error:
            client.infer("slow", add_inputs(ones, ones), client_timeout=0.5)
        assert error.value.status() == str(grpc.StatusCode.DEADLINE_EXCEEDED)
        assert time.monotonic() - started < 2.0  # not the model's 3 s
    check_add(node.target)


def test_unload_unloads_from_triton_and_an_immediate_reload_works(node: NodeProcess, triton: TritonProcess) -> None:
    check_add(node.target)
    with grpcclient.InferenceServerClient(node.target) as client:
        client.unload_model("add")
        with pytest.raises(InferenceServerException) as error:
            client.infer("add", add_inputs(*[np.ones((1, WIDTH), np.float32)] * 2))
        assert error.value.status() == str(grpc.StatusCode.NOT_FOUND)
        # Told to unload: no longer READY. Whether Triton is still UNLOADING it or done is Triton's timing.
        assert triton_states(triton)["add"] != "READY"
        client.load_model("add")  # while Triton is most likely still UNLOADING it
    assert triton_states(triton)["add"] == "READY"
    check_add(node.target)


def test_a_model_stored_outside_tritons_repository_is_uploaded(node: NodeProcess, triton: TritonProcess,
                                                               tmp_path: Path) -> None:
    storage = write_python_add_sub(tmp_path, "stored-elsewhere")
    with grpcclient.InferenceServerClient(node.target) as client:
        client.load_model("ext", config=json.dumps({"storage_uri": str(storage)}))
    check_add(node.target, "ext")
    with grpcclient.InferenceServerClient(triton.grpc_target) as client:
        assert client.is_model_ready("ext")  # an upload is not in Triton's repository index
    assert not (triton.model_repository / "ext").exists()


def test_a_load_that_overflows_the_capacity_evicts_the_other_model_from_triton(
    etcd: EtcdProcess, repo: Path, tritons: Start,
) -> None:
    triton = tritons(repo)
    # One Python-backend model is ~44 MiB (its stub process), so two do not fit in 64 MiB.
    small = start_triton_node(etcd, repo, triton, capacity="64MiB")
    try:
        check_add(small.target, "add")
        check_add(small.target, "add2")
        assert metric(small, "modelmesh_evictions_total") == 1
        wait_triton_state(triton, "add", "UNAVAILABLE")
        assert triton_states(triton)["add2"] == "READY"
        check_add(small.target, "add")  # and back: add2 goes
        wait_triton_state(triton, "add2", "UNAVAILABLE")
    finally:
        small.stop()


def test_in_a_mesh_a_request_to_one_node_is_served_by_the_copy_in_the_other_nodes_triton(
    etcd: EtcdProcess, repo: Path, tritons: Start,
) -> None:
    servers = [tritons(repo), tritons(repo)]
    prefix = f"t-mesh-{time.monotonic_ns()}"
    # One copy only: the mesh would otherwise add a second copy for a model in repeated use.
    nodes = [start_triton_node(etcd, repo, t, prefix=prefix, extra=["--max-copies", "1"]) for t in servers]
    try:
        check_add(nodes[0].target, "add2")
        held = [triton_states(t).get("add2") == "READY" for t in servers]
        assert sorted(held) == [False, True], held
        other = held.index(False)  # its node has no copy: it must forward to the holder's
        for _ in range(5):
            check_add(nodes[other].target, "add2")
        assert [triton_states(t).get("add2") == "READY" for t in servers] == held
        assert metric(nodes[other], "modelmesh_loadmodel_total") == 0
    finally:
        for process in nodes:
            process.stop()


def test_a_model_that_triton_lost_is_loaded_again_by_the_next_request(node: NodeProcess,
                                                                      triton: TritonProcess) -> None:
    check_add(node.target, "add2")
    with grpcclient.InferenceServerClient(triton.grpc_target) as client:
        client.unload_model("add2")  # behind the node's back, as a Triton restart would
    wait_triton_state(triton, "add2", "UNAVAILABLE")
    check_add(node.target, "add2")  # answered: the node forgot its copy and loaded it again
    assert triton_states(triton)["add2"] == "READY"
    check_add(node.target, "add2")


def test_a_node_starts_by_unloading_what_an_earlier_node_left_in_triton(etcd: EtcdProcess, repo: Path,
                                                                         tritons: Start) -> None:
    triton = tritons(repo)
    with grpcclient.InferenceServerClient(triton.grpc_target) as client:
        client.load_model("add")
    fresh = start_triton_node(etcd, repo, triton)
    try:
        wait_triton_state(triton, "add", "UNAVAILABLE")
        check_add(fresh.target, "add")
    finally:
        fresh.stop()


def test_a_mixed_mesh_loads_each_model_on_a_node_whose_runtime_runs_it(
    etcd: EtcdProcess, repo: Path, tritons: Start, tmp_path: Path,
) -> None:
    onnx_repo = tmp_path / "onnx"
    write_mlp(onnx_repo, "plain", approx_bytes=50_000)
    prefix = f"t-mixed-{time.monotonic_ns()}"
    beside_triton = start_triton_node(etcd, repo, tritons(repo), prefix=prefix)
    # More room than the Triton node: placement by room alone would send Triton's models here.
    in_process = start_node(etcd, onnx_repo, capacity="4GiB", prefix=prefix, extra_args=["--no-proactive-loads"])
    try:
        check_add(in_process.target, "add")  # a Python-backend model: only the Triton node can load it
        x = np.ones((1, 16), np.float32)
        with grpcclient.InferenceServerClient(beside_triton.target) as client:
            metadata = client.get_model_metadata("add2")  # loaded by the Triton node to answer
            assert metadata.name == "add2" and [i.name for i in metadata.inputs] == ["INPUT0", "INPUT1"]
            inp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
            inp.set_data_from_numpy(x)
            answer = client.infer("plain", [inp]).as_numpy("OUTPUT0")  # an ONNX file: only ORT runs it here
        np.testing.assert_allclose(answer, mlp_reference(onnx_repo / "plain", x), rtol=1e-4, atol=1e-5)
        assert metric(in_process, "modelmesh_loadmodel_total") == 1  # plain only
        assert metric(in_process, "modelmesh_loadmodel_failure_total") == 0  # never tried a Triton model
        assert metric(beside_triton, "modelmesh_loadmodel_total") == 2  # add and add2
        nodes = subprocess.run([sys.executable, "-m", "meshnode", "nodes", "--json", "--target", in_process.target],
                               capture_output=True, text=True, timeout=60, check=True)
        assert sorted(n["runtime"] for n in json.loads(nodes.stdout)) == ["onnxruntime", "triton"]
    finally:
        in_process.stop()
        beside_triton.stop()


def test_meshserve_local_can_run_every_node_beside_a_triton_of_its_own(repo: Path, tmp_path: Path) -> None:
    with LocalMesh.start(nodes=2, model_repository=repo, capacity="1GiB", log_dir=tmp_path, triton=True) as mesh:
        assert len({t.grpc_target for t in mesh.tritons}) == 2 and "triton-1" in mesh.describe()
        check_add(mesh.targets()[1], "add")
        servers = list(mesh.tritons)
    assert not any(server.running for server in servers)


def test_a_triton_that_crashes_and_restarts_is_used_again_without_restarting_the_node(
    etcd: EtcdProcess, repo: Path, tritons: Start,
) -> None:
    triton = tritons(repo)
    node = start_triton_node(etcd, repo, triton)
    try:
        check_add(node.target, "add")
        triton.kill()  # and its stubs: every model is gone
        ones = np.ones((1, WIDTH), np.float32)
        with grpcclient.InferenceServerClient(node.target) as client, pytest.raises(InferenceServerException) as down:
            client.infer("add", add_inputs(ones, ones), client_timeout=10)
        assert down.value.status() == str(grpc.StatusCode.UNAVAILABLE), down.value
        assert triton.grpc_target in (down.value.message() or ""), down.value
        triton.start_again()  # same ports, nothing loaded

        def answers() -> bool:
            try:
                check_add(node.target, "add")
            except InferenceServerException as error:
                assert error.status() == str(grpc.StatusCode.UNAVAILABLE), error  # only Triton's absence may fail it
                return False
            return True

        # The node reconnects within its 1 s backoff, finds its copy gone, loads it again and answers. The bound is
        # generous: a Python-backend load takes 1.4 s on a quiet machine and several times that on a busy one.
        wait_until_blocking(answers, 40, "the node to answer through the restarted Triton")
        assert triton_states(triton)["add"] == "READY"
    finally:
        node.stop()
