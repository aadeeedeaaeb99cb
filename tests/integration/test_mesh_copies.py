"""Copies under load: hot models get company, min_copies holds, pinned models stay."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient

from deploy.local.models import write_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.mesh import LocalMesh
from tests.integration.conftest import start_node
from tests.integration.helpers import metric, wait_until


def x_input() -> list[aioclient.InferInput]:
    inp = aioclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.ones((1, 16), np.float32))
    return [inp]


async def copies_of(target: str, name: str) -> str:
    async with aioclient.InferenceServerClient(target) as client:
        index = {m.name: m for m in (await client.get_model_repository_index()).models}
    return index[name].reason


async def wait_for_copies(target: str, name: str, count: int, timeout_s: float) -> str:
    async def enough() -> bool:
        return (await copies_of(target, name)).count("(loaded)") >= count

    await wait_until(enough, timeout_s, f"{count} loaded copies of {name}")
    return await copies_of(target, name)


async def test_a_hot_model_gets_extra_copies_and_min_copies_holds(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_mlp(repo, "hot", approx_bytes=100_000)
    write_mlp(repo, "cold", approx_bytes=100_000, seed=1)
    spare = write_mlp(tmp_path / "extra", "twice", approx_bytes=100_000, seed=2)
    args = ["--hot-rate-per-copy", "20", "--copy-check-interval", "1"]
    with LocalMesh.start(nodes=3, model_repository=repo, capacity="64MiB", log_dir=tmp_path,
                         extra_args=args) as mesh:
        target = mesh.targets()[0]
        async with aioclient.InferenceServerClient(target) as client:
            await client.infer("cold", x_input())
            stop = time.monotonic() + 6.0
            # Back-to-back batches for 6 s: far above one copy's threshold of 20 req/s.
            while time.monotonic() < stop:
                await asyncio.gather(*(client.infer("hot", x_input()) for _ in range(4)))
            reason = await wait_for_copies(target, "hot", 2, timeout_s=10)
            assert "node-" in reason
            assert (await copies_of(target, "cold")).count("(loaded)") == 1  # one use: one copy
            await client.load_model("twice", config=json.dumps({"storage_uri": str(spare), "min_copies": 2}))
            await wait_for_copies(target, "twice", 2, timeout_s=10)


async def test_a_pinned_model_is_never_evicted(etcd: EtcdProcess, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for i in range(6):
        write_mlp(repo, f"m{i}", approx_bytes=1_000_000, seed=i)
    node = start_node(etcd, repo, capacity="5MiB")
    try:
        async with aioclient.InferenceServerClient(node.target) as client:
            await client.load_model("m0", config=json.dumps({"pinned": True}))
            for _ in range(2):
                for i in range(1, 6):
                    await client.infer(f"m{i}", x_input())
            assert metric(node, "modelmesh_evictions_total") >= 3
            index = {m.name: m.state for m in (await client.get_model_repository_index()).models}
            assert index["m0"] == "READY"
            with pytest.raises(Exception, match="min_copies"):
                await client.load_model("m1", config=json.dumps({"min_copies": 0}))
    finally:
        node.stop()
