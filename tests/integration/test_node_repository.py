"""Registration in etcd: lazy at start, by load with storage_uri or uploaded files, across restarts."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from deploy.local.models import mlp_reference, write_add_sub, write_mlp
from meshnode.local.etcd import EtcdProcess
from tests.integration.conftest import start_node


def ones_input() -> grpcclient.InferInput:
    inp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.ones((1, 16), np.float32))
    return inp


def index_of(client: grpcclient.InferenceServerClient) -> dict[str, tuple[str, str]]:
    return {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}


def test_models_are_registered_lazily_and_unload_makes_them_not_found_until_loaded(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    write_mlp(repo, "a", approx_bytes=100_000)
    write_mlp(repo, "b", approx_bytes=100_000, seed=3)
    node = start_node(etcd, repo)
    try:
        with grpcclient.InferenceServerClient(node.target) as client:
            index = index_of(client)
            assert index["a"][0] == "" and "first request" in index["a"][1]  # nothing loaded yet
            assert client.is_model_ready("a")  # servable: it loads on demand
            client.infer("a", [ones_input()])
            assert index_of(client)["a"][0] == "READY"
            client.unload_model("a")
            assert index_of(client)["a"] == ("UNAVAILABLE", "unloaded")
            assert not client.is_model_ready("a")
            with pytest.raises(InferenceServerException) as err:
                client.infer("a", [ones_input()])
            assert err.value.status() == "StatusCode.NOT_FOUND"
            client.load_model("a")
            assert index_of(client)["a"][0] == "READY"
            client.infer("a", [ones_input()])
    finally:
        node.stop()


def test_load_registers_from_storage_uri_and_uploaded_files_and_it_survives_restart(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    elsewhere = tmp_path / "elsewhere"
    model_dir = write_mlp(elsewhere, "outside", approx_bytes=100_000)
    single_file = write_add_sub(elsewhere, "single") / "1" / "model.onnx"
    upload_src = write_mlp(tmp_path / "upload-src", "u", approx_bytes=50_000, seed=9)
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    node = start_node(etcd, repo, prefix=prefix)
    try:
        with grpcclient.InferenceServerClient(node.target) as client:
            client.load_model("outside", config=json.dumps({"storage_uri": str(model_dir)}))
            client.load_model("single", config=json.dumps({"storage_uri": single_file.as_uri()}))
            client.load_model("uploaded", files={"file:1/model.onnx": (upload_src / "1" / "model.onnx").read_bytes()})
            x = np.ones((1, 16), np.float32)
            out = client.infer("outside", [ones_input()]).as_numpy("OUTPUT0")
            np.testing.assert_allclose(out, mlp_reference(model_dir, x), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(client.infer("uploaded", [ones_input()]).as_numpy("OUTPUT0"),
                                       mlp_reference(upload_src, x), rtol=1e-4, atol=1e-5)
            assert (repo / "uploaded" / "1" / "model.onnx").exists()
            client.unload_model("outside")
            with pytest.raises(InferenceServerException) as err:
                client.load_model("ghost")
            assert "ghost" in err.value.message()
    finally:
        node.stop()
    node = start_node(etcd, repo, prefix=prefix)  # same etcd prefix: a restart
    try:
        with grpcclient.InferenceServerClient(node.target) as client:
            index = index_of(client)
            assert set(index) >= {"outside", "single", "uploaded"}
            assert index["outside"] == ("UNAVAILABLE", "unloaded")  # an unload outlives the restart
            inputs = [grpcclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
            for inp in inputs:
                inp.set_data_from_numpy(np.ones((1, 16), np.float32))
            assert client.infer("single", inputs).as_numpy("OUTPUT0")[0, 0] == 2.0
            np.testing.assert_allclose(client.infer("uploaded", [ones_input()]).as_numpy("OUTPUT0"),
                                       mlp_reference(upload_src, x), rtol=1e-4, atol=1e-5)
    finally:
        node.stop()


def test_load_rejects_bad_parameters_clearly(etcd: EtcdProcess, tmp_path: Path) -> None:
    node = start_node(etcd, tmp_path)
    try:
        with grpcclient.InferenceServerClient(node.target) as client:
            for kwargs, fragment in (
                ({"config": "{not json"}, "JSON"),
                ({"config": json.dumps({"storage_uri": str(tmp_path / "missing")})}, "does not exist"),
                ({"files": {"file:../escape/model.onnx": b"x"}}, "Invalid file path"),
            ):
                with pytest.raises(InferenceServerException) as err:
                    client.load_model("x", **kwargs)  # type: ignore[arg-type]
                assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
                assert fragment in err.value.message()
            assert client.is_server_live()
    finally:
        node.stop()
