"""A model re-registered with new files through one node is answered with the new files through every node: the
other nodes' copies of the old files are unloaded (meshnode.control.stale_copies), not left answering."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient

from deploy.local.models import mlp_reference, write_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from tests.integration.conftest import start_nodes
from tests.integration.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

X = np.random.default_rng(5).standard_normal((1, 16)).astype(np.float32)


@pytest.fixture
def nodes(etcd: EtcdProcess, tmp_path: Path) -> Iterator[list[NodeProcess]]:
    (tmp_path / "repo").mkdir()
    started = start_nodes(etcd, tmp_path / "repo", 2, extra_args=["--no-proactive-loads"])
    try:
        yield started
    finally:
        for node in started:
            node.stop()


async def answer(client: aioclient.InferenceServerClient) -> np.ndarray:
    x = aioclient.InferInput("INPUT0", list(X.shape), "FP32")
    x.set_data_from_numpy(X)
    output: np.ndarray | None = (await client.infer("gen", [x], client_timeout=10)).as_numpy("OUTPUT0")
    assert output is not None
    return output


async def both_loaded(client: aioclient.InferenceServerClient) -> bool:
    index = await client.get_model_repository_index(as_json=True)
    reason: str = next(m.get("reason", "") for m in index["models"] if m["name"] == "gen")
    return reason.count("(loaded)") == 2


async def test_new_weights_registered_through_one_node_answer_through_the_other(
        nodes: list[NodeProcess], tmp_path: Path) -> None:
    old_dir, new_dir = (write_mlp(tmp_path / which, "gen", approx_bytes=50_000, seed=seed)
                        for which, seed in (("old", 1), ("new", 2)))
    old, new = mlp_reference(old_dir, X), mlp_reference(new_dir, X)
    assert not np.allclose(old, new)
    upload = {which: {"file:1/model.onnx": (d / "1" / "model.onnx").read_bytes()}
              for which, d in (("old", old_dir), ("new", new_dir))}
    async with (aioclient.InferenceServerClient(nodes[0].target) as a,
                aioclient.InferenceServerClient(nodes[1].target) as b):
        await a.load_model("gen", files=upload["old"])
        await b.load_model("gen")  # the same registration: a copy on b too
        await wait_until(lambda: both_loaded(a), 10, "a loaded copy on both nodes")
        np.testing.assert_allclose(await answer(b), old, rtol=1e-4, atol=1e-5)

        await a.load_model("gen", files=upload["new"])  # through a: b's copy has the old weights

        async def b_answers_new() -> bool:
            return bool(np.allclose(await answer(b), new, rtol=1e-4, atol=1e-5))

        await wait_until(b_answers_new, 3, "node b answering with the new weights")
        np.testing.assert_allclose(await answer(a), new, rtol=1e-4, atol=1e-5)
