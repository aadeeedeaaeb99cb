"""After a node is killed and comes back, every node's RepositoryIndex agrees again within 2 s of it being
ready, and no node lists a copy on a node that has left the mesh."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient

from deploy.local.models import write_mlp
from meshnode.local.mesh import LocalMesh
from tests.integration.helpers import wait_until

MODELS = ("v0", "v1", "v2")
AGREE_WITHIN_S = 2.0


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    repo = tmp_path / "models"
    for i, name in enumerate(MODELS):
        write_mlp(repo, name, approx_bytes=100_000, seed=i)
    with LocalMesh.start(nodes=3, model_repository=repo, capacity="64MiB", log_dir=tmp_path / "logs",
                         extra_args=["--no-proactive-loads"]) as started:
        yield started


async def index(target: str) -> dict[str, tuple[str, str]]:
    """Each model's state and the copies the node lists ('copies: node-0 (loaded), ...'), as it answers."""
    async with aioclient.InferenceServerClient(target) as client:
        models = (await client.get_model_repository_index()).models
    return {m.name: (m.state, m.reason if m.reason.startswith("copies:") else "") for m in models}


async def views(mesh: LocalMesh) -> list[dict[str, tuple[str, str]]]:
    return [await index(target) for target in mesh.targets()]


async def test_indexes_agree_within_two_seconds_after_a_killed_node_returns(mesh: LocalMesh) -> None:
    x = np.ones((1, 16), np.float32)
    inp = aioclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    for i, name in enumerate(MODELS):  # one model loaded on each node: the one asked first
        async with aioclient.InferenceServerClient(mesh.targets()[i]) as client:
            await client.load_model(name)
            await client.infer(name, [inp])

    async def agree() -> bool:
        seen = await views(mesh)
        return all(view == seen[0] for view in seen)

    await wait_until(agree, 10.0, "the nodes' indexes to agree before the fault")
    before = (await views(mesh))[0]
    assert {name: state for name, (state, _) in before.items()} == dict.fromkeys(MODELS, "READY")
    assert "node-1" in before["v1"][1]

    mesh.nodes[1].kill()
    mesh.start_again(1)
    ready_at = time.monotonic()
    await wait_until(agree, 10.0, "the nodes' indexes to agree after node-1 came back")
    took = time.monotonic() - ready_at
    after = (await views(mesh))[0]
    assert "node-1" not in after["v1"][1]  # its copy died with it; nobody lists it any more
    assert took <= AGREE_WITHIN_S, f"indexes agreed {took:.2f}s after node-1 was ready"


async def test_a_node_that_left_is_listed_by_no_one(mesh: LocalMesh) -> None:
    for i, name in enumerate(MODELS):
        async with aioclient.InferenceServerClient(mesh.targets()[i]) as client:
            await client.load_model(name)
    mesh.nodes[2].kill()

    async def forgotten() -> bool:
        return all("node-2" not in reason for view in [await index(t) for t in mesh.targets()[:2]]
                   for _, reason in view.values())

    # Its lease (5 s) ends it in the mesh; from then on no view may list it.
    await wait_until(forgotten, 10.0, "node-2's copies to leave every view")
    for _ in range(10):
        assert await forgotten()
