"""Just-in-time loads, one load per model however many wait, LRU eviction by measured bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from deploy.local.models import mlp_reference, write_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from tests.integration.conftest import start_node
from tests.integration.helpers import metric

MODEL_BYTES = 1_000_000


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small-repo")
    for i in range(8):
        write_mlp(root, f"m{i}", approx_bytes=MODEL_BYTES, seed=i)
    write_mlp(root, "huge", approx_bytes=12_000_000)
    return root


@pytest.fixture(scope="module")
def small_node(etcd: EtcdProcess, small_repo: Path) -> Iterator[NodeProcess]:
    # Room for four or five 1 MB models once measured (ORT holds about 1-2x the file size).
    process = start_node(etcd, small_repo, capacity="5MiB")
    yield process
    process.stop()


def mlp_input(batch: int = 1) -> list[aioclient.InferInput]:
    inp = aioclient.InferInput("INPUT0", [batch, 16], "FP32")
    inp.set_data_from_numpy(np.ones((batch, 16), np.float32))
    return [inp]


async def test_concurrent_cold_requests_cause_exactly_one_load(small_node: NodeProcess, small_repo: Path) -> None:
    loads_before = metric(small_node, "modelmesh_loadmodel_total")
    async with aioclient.InferenceServerClient(small_node.target) as client:
        results = await asyncio.gather(*(client.infer("m0", mlp_input()) for _ in range(24)))
    expected = mlp_reference(small_repo / "m0", np.ones((1, 16), np.float32))
    for result in results:
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-4, atol=1e-5)
    assert metric(small_node, "modelmesh_loadmodel_total") == loads_before + 1


async def test_lru_models_are_evicted_to_make_room_and_used_bytes_stay_within_capacity(
    small_node: NodeProcess,
) -> None:
    async with aioclient.InferenceServerClient(small_node.target) as client:
        for i in range(8):
            await client.infer(f"m{i}", mlp_input())
            # keep m0 hot: it must survive while colder models are evicted
            await client.infer("m0", mlp_input())
        index = {m.name: m.state for m in (await client.get_model_repository_index()).models}
    assert metric(small_node, "modelmesh_evictions_total") >= 1
    assert index["m0"] == "READY"
    assert index["m7"] == "READY"
    assert any(index[f"m{i}"] != "READY" for i in range(1, 7))
    assert metric(small_node, "modelmesh_instance_used_bytes") <= metric(small_node,
                                                                         "modelmesh_instance_capacity_bytes")
    # Sizes are measured: at least the model file's bytes per loaded model.
    loaded = sum(1 for state in index.values() if state == "READY")
    assert metric(small_node, "modelmesh_instance_used_bytes") >= loaded * MODEL_BYTES * 0.9


def test_a_model_larger_than_the_capacity_is_resource_exhausted_and_evicts_nothing(
    small_node: NodeProcess,
) -> None:
    with grpcclient.InferenceServerClient(small_node.target) as client:
        client.infer("m1", [_sync_input()])
        evictions = metric(small_node, "modelmesh_evictions_total")
        with pytest.raises(InferenceServerException) as err:
            client.infer("huge", [_sync_input()])
        assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "huge" in err.value.message() and "capacity" in err.value.message()
        assert metric(small_node, "modelmesh_evictions_total") == evictions
        assert client.is_model_ready("m1")


def _sync_input() -> grpcclient.InferInput:
    inp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.ones((1, 16), np.float32))
    return inp


async def test_metrics_endpoint_uses_modelmesh_names(etcd: EtcdProcess, small_repo: Path) -> None:
    # A node of its own: its counters then start at zero, whatever the other tests did.
    node = start_node(etcd, small_repo, capacity="5MiB", extra_args=["--no-proactive-loads"])
    try:
        async with aioclient.InferenceServerClient(node.target) as client:
            for _ in range(2):
                await client.infer("m0", mlp_input())  # a miss that loads it, then a hit
        expected = {
            "modelmesh_invoke_model_milliseconds_count": 2, "modelmesh_loadmodel_milliseconds_count": 1,
            "modelmesh_cache_miss_total": 1, "modelmesh_cache_hit_total": 1,
            "modelmesh_instance_capacity_bytes": 5 * 1024 * 1024, "modelmesh_instance_models_total": 1,
        }
        assert {name: metric(node, name) for name in expected} == expected
    finally:
        node.stop()


async def test_a_model_in_steady_use_outlives_a_stream_of_one_off_models(etcd: EtcdProcess, small_repo: Path) -> None:
    node = start_node(etcd, small_repo, capacity="5MiB")  # three or four of these 1 MB models
    try:
        async with aioclient.InferenceServerClient(node.target) as client:
            for _ in range(3):
                await client.infer("m0", mlp_input())  # used again since its load: reuse-protected
            for i in range(1, 8):
                await client.infer(f"m{i}", mlp_input())  # each used once; plain LRU would evict m0 early
            index = {m.name: m.state for m in (await client.get_model_repository_index()).models}
        assert metric(node, "modelmesh_evictions_total") >= 3
        assert index["m0"] == "READY"
    finally:
        node.stop()
