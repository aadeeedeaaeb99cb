"""20,000 registered models (issue 17): nodes become ready, no lease is lost while they start, and a node
holds at most 500 bytes per registered, unloaded model (RSS against a node of 10 models)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.density_probe import build_repository, rss_bytes
from meshnode.etcd.store import EtcdStore
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess

COUNT = 20_000
FLOOR = 10
GOAL_BYTES_PER_MODEL = 500

pytestmark = pytest.mark.timeout(180)


def start(etcd: EtcdProcess, repo: Path, prefix: str, instance_id: str) -> NodeProcess:
    return NodeProcess.start(etcd=etcd.endpoint, model_repository=repo, capacity="256MiB", etcd_prefix=prefix,
                             instance_id=instance_id, timeout_s=120)


@pytest.fixture
async def store(etcd: EtcdProcess, etcd_prefix: str) -> AsyncIterator[EtcdStore]:
    s = await EtcdStore.connect(etcd.endpoint, etcd_prefix)
    yield s
    await s.close()


async def test_twenty_thousand_models_start_without_losing_a_lease_in_little_memory(
        etcd: EtcdProcess, etcd_prefix: str, store: EtcdStore, tmp_path: Path) -> None:
    dense_repo, floor_repo = build_repository(tmp_path / "dense", COUNT), build_repository(tmp_path / "floor", FLOOR)
    _, revision = await store.snapshot_prefix("instances/")
    departures: list[str] = []

    async def follow() -> None:
        async for event in store.watch_prefix("instances/", revision + 1):
            if event.type == "delete":
                departures.append(event.key)

    watch = asyncio.create_task(follow())
    nodes: list[NodeProcess] = []
    try:
        floor = await asyncio.to_thread(start, etcd, floor_repo, f"{etcd_prefix}-floor", "floor")
        nodes.append(floor)
        # n0 registers the repository for the mesh; n1 finds it registered and only lists it.
        for instance_id in ("n0", "n1"):
            nodes.append(await asyncio.to_thread(start, etcd, dense_repo, etcd_prefix, instance_id))
        # As the density check measures it: the node that only lists the registry, as soon as it is ready.
        per_model = (rss_bytes(nodes[2].process.pid) - rss_bytes(floor.process.pid)) / (COUNT - FLOOR)
        registered = await store.snapshot_prefix("models/")
        assert len(registered[0]) == COUNT
        assert per_model <= GOAL_BYTES_PER_MODEL, f"{per_model:.0f} bytes per registered model"
        assert departures == []  # no node seen leaving: no lease expired while they started
        assert not any("expired; granting a new one" in n.log() for n in nodes)
    finally:
        watch.cancel()
        for node in nodes:
            node.stop()
