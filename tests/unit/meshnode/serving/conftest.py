"""The kit fixture of the ThreadedHits tests (tests.unit.meshnode.serving.threaded_kit)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from meshnode.serving.dataplane import DataPlane
from meshnode.serving.statistics import ModelStatistics
from meshnode.serving.threaded_hits import ThreadedHits
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import ME, FakeRouter, NodeParts
from tests.unit.meshnode.serving.threaded_kit import MAX_INFLIGHT, QUEUED, RUNS, Kit, NotifyingLock, no_metadata


@pytest.fixture
async def kit(tmp_path: Path) -> AsyncIterator[Kit]:
    node = await NodeParts(FakeStore(), tmp_path / "repo", runs_per_copy=RUNS, max_queued=QUEUED).start(mesh=False)
    node.cache.inflight_lock = NotifyingLock()  # type: ignore[assignment]  # before the parts that take it
    dataplane = DataPlane(replica=node.replica, router=FakeRouter().router, cache=node.cache, registry=node.registry,
                          alias_targets={}, metadata_elsewhere=no_metadata, metrics=node.metrics, version="1",
                          max_inflight=MAX_INFLIGHT)
    statistics = ModelStatistics(node.clock)
    hits = ThreadedHits(cache=node.cache, dataplane=dataplane, alias_targets={"front": "m"},
                        records=node.registry.view, metrics=node.metrics, statistics=statistics, instance_id=ME,
                        loop=asyncio.get_running_loop())
    workers = ThreadPoolExecutor(32, thread_name_prefix="worker")
    yield Kit(node, dataplane, statistics, hits, workers)
    workers.shutdown(wait=True)  # every run is bounded (CallerModel's gate waits at most WAIT_S)
    await node.stop()
