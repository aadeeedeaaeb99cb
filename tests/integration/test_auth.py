"""Plaintext peers that prove membership with the mesh secret: their hops are honoured, a client's are not."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient

from deploy.local.models import write_mlp
from meshnode.local.mesh import LocalMesh
from tests.integration.conftest import GRPC_SERVERS
from tests.integration.helpers import metric

ADMIN = "admin-token-0c94e1"


@pytest.fixture(scope="module", params=GRPC_SERVERS)
def mesh(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LocalMesh]:
    root = tmp_path_factory.mktemp("auth")
    write_mlp(root / "repo", "m", approx_bytes=100_000)
    (root / "secret").write_text("a-mesh-secret-of-enough-bytes\n")
    (root / "tokens").write_text(f"{ADMIN} admin\n")
    with LocalMesh.start(nodes=2, model_repository=root / "repo", capacity="64MiB", log_dir=root / "logs",
                         extra_args=["--no-proactive-loads", "--max-copies", "1", "--mesh-secret-file",
                                     str(root / "secret"), "--auth-tokens", str(root / "tokens"),
                                     "--grpc-server", request.param]) as started:
        yield started


def x_input() -> list[aioclient.InferInput]:
    inp = aioclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.ones((1, 16), np.float32))
    return [inp]


async def test_signed_forwards_are_honoured_and_a_clients_hop_is_not(mesh: LocalMesh) -> None:
    for node in mesh.nodes:
        async with aioclient.InferenceServerClient(node.target) as client:
            for _ in range(3):
                await client.infer("m", x_input())
    # One copy served both nodes: one of them forwarded with a hop, which the other honoured.
    assert sum(metric(n, "modelmesh_loadmodel_total") for n in mesh.nodes) == 1
    assert sum(metric(n, "meshserve_hops_stripped_total") for n in mesh.nodes) == 0
    async with aioclient.InferenceServerClient(mesh.nodes[0].target) as client:
        await client.infer("m", x_input(), parameters={"meshserve_hop": "0|load-last|"})
    assert metric(mesh.nodes[0], "meshserve_hops_stripped_total") == 1


async def test_repository_control_needs_the_admin_role(mesh: LocalMesh) -> None:
    async with aioclient.InferenceServerClient(mesh.nodes[0].target) as client:
        with pytest.raises(Exception, match="UNAUTHENTICATED"):
            await client.unload_model("m")
        await client.load_model("m", headers={"authorization": f"Bearer {ADMIN}"})
