"""A Triton model with two versions (version_policy all): through a node, a request for a version is answered
by that version or gets NOT_FOUND naming it, and a request without one by the newest; never by another."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from deploy.local.models import mlp_reference
from deploy.local.triton_models import write_python_onnx_mlp
from meshnode.local.mesh import LocalMesh

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[LocalMesh, Path]]:
    repo = tmp_path / "models"
    for version in (1, 2):
        model_dir = write_python_onnx_mlp(repo, "tm_v", version, approx_bytes=50_000, seed=version)
    with (model_dir / "config.pbtxt").open("a") as config:
        config.write("version_policy: { all { } }\n")
    with LocalMesh.start(nodes=1, model_repository=repo, capacity="1GiB", log_dir=tmp_path / "logs", triton=True,
                         extra_args=["--no-proactive-loads"]) as started:
        yield started, model_dir


def test_each_version_answers_as_itself_and_both_are_held_side_by_side(mesh: tuple[LocalMesh, Path]) -> None:
    local, model_dir = mesh
    x = np.random.default_rng(5).standard_normal((1, 16)).astype(np.float32)
    expected = {version: mlp_reference(model_dir, x, int(version)) for version in ("1", "2")}
    assert not np.allclose(expected["1"], expected["2"], rtol=1e-3)
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(x)
    with grpcclient.InferenceServerClient(local.targets()[0]) as client:
        for asked in ("", "1", "", "2", "1", ""):
            answer = client.infer("tm_v", [tensor], model_version=asked, client_timeout=60)
            meant = asked or "2"  # the newest version the policy makes available
            assert answer.get_response().model_version == meant
            np.testing.assert_allclose(answer.as_numpy("OUTPUT0"), expected[meant], rtol=1e-4, atol=1e-5,
                                       err_msg=f"asked for version {asked!r}")
        with pytest.raises(InferenceServerException) as error:
            client.infer("tm_v", [tensor], model_version="3", client_timeout=60)
        assert error.value.status() == "StatusCode.NOT_FOUND" and "version 3" in (error.value.message() or "")
    with grpcclient.InferenceServerClient(local.tritons[0].grpc_target) as triton:
        index = triton.get_model_repository_index(as_json=True).get("models", [])
    ready = sorted(m["version"] for m in index if m["name"] == "tm_v" and m.get("state") == "READY")
    assert ready == ["1", "2"], index  # one Triton model holding both versions, neither replaced the other
