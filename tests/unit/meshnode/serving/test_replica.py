"""LocalReplica over the real cache and registry (on a fake etcd): which models it serves, and how it sizes them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from meshnode.errors import ModelLost, ModelNotFound, ModelUnavailable, ResourceExhausted
from meshnode.serving.entries import LoadOptions
from meshnode.storage.repository import model_source
from meshpb import pb
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import ME, NOW, SIZE, FakeRuntime, NodeParts

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeParts]:
    parts = await NodeParts(FakeStore(), tmp_path / "repo", runtime=FakeRuntime(predicted=77)).start(mesh=False)
    yield parts
    await parts.stop()


async def test_acquire_loads_the_latest_version_or_the_one_asked_for(node: NodeParts) -> None:
    await node.register("m", versions=("1", "2"))
    latest = await node.replica.acquire("m", "")
    first = await node.replica.acquire("m", "1")
    assert (latest.key, first.key) == ("m@2", "m@1")
    assert node.runtime.loads == ["m@2", "m@1"]
    assert node.replica.has_copy("m", "") and node.replica.has_copy("m", "2") and not node.replica.has_copy("x", "")


@pytest.mark.parametrize("enabled", [None, False])
async def test_an_unknown_or_unloaded_model_is_not_found(node: NodeParts, enabled: bool | None) -> None:
    if enabled is not None:
        await node.register("m", enabled=enabled)
    with pytest.raises(ModelNotFound) as raised:
        await node.replica.acquire("m", "")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert str(raised.value) == "Request for unknown model: 'm' is not found"  # Triton's words
    assert node.runtime.loads == []


async def test_a_model_for_another_runtime_is_unavailable_here(node: NodeParts) -> None:
    await node.register("t", runtime="triton")
    with pytest.raises(ModelUnavailable) as raised:
        await node.replica.acquire("t", "")
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE and raised.value.retry_elsewhere
    assert str(raised.value) == "model 't' runs on triton nodes; this node runs onnxruntime"
    assert node.runtime.loads == []


async def test_a_model_for_any_runtime_or_this_one_loads_here(node: NodeParts) -> None:
    await node.register("any", runtime="")
    await node.register("mine", runtime="onnxruntime")
    await node.use("any")
    await node.use("mine")
    assert node.runtime.loads == ["any@1", "mine@1"]


async def test_an_unknown_version_is_not_found(node: NodeParts) -> None:
    await node.register("m", versions=("1",))
    with pytest.raises(ModelNotFound, match="^Request for unknown model: 'm' version 3 is not found$"):
        await node.replica.acquire("m", "3")


@pytest.mark.parametrize(("size_hint", "size_bytes", "expected"), [
    (500, 300, 500),  # the registered hint first: its owner knows what its code pulls in
    (None, 300, 300),  # else what a node measured once loaded
    (None, None, 77),  # else the runtime's prediction from the files
])
async def test_load_options_size_a_model_by_hint_else_measured_else_predicted(
        node: NodeParts, size_hint: int | None, size_bytes: int | None, expected: int) -> None:
    record = await node.register("m", size_hint=size_hint, size_bytes=size_bytes, load_timeout_s=9.0, pinned=True,
                                 last_used=NOW - 5)
    options = node.replica.load_options(record, model_source("m", Path(record.storage), ""), churn_guard=True)
    assert options == LoadOptions(predicted_bytes=expected, timeout_s=9.0, pinned=True, churn_guard=True,
                                  last_used=NOW - 5)
    assert node.runtime.predictions == ([] if expected != 77 else ["m"])


async def test_acquire_holds_the_copy_with_the_records_options(node: NodeParts) -> None:
    await node.register("m", pinned=True, size_hint=SIZE * 3)
    entry = await node.replica.acquire("m", "")
    assert entry.pinned and entry.size_bytes == SIZE  # measured once loaded, whatever was predicted
    node.cache.release(entry)


async def test_infer_with_the_churn_guard_refuses_to_evict_a_recent_model(tmp_path: Path) -> None:
    parts = await NodeParts(FakeStore(), tmp_path / "repo", capacity=SIZE, churn_guard_s=60.0).start(mesh=False)
    try:
        await parts.register("hot")
        await parts.register("cold")
        await parts.use("hot")
        request = pb.ModelInferRequest(model_name="cold")
        with pytest.raises(ResourceExhausted, match=r"used in the last 60s \(churn guard\)$"):
            await parts.replica.infer(request, churn_guard=True)
        response = await parts.replica.infer(request)  # placement has no other node: it evicts here
        assert response.model_name == "cold" and not parts.replica.has_copy("hot", "")
    finally:
        await parts.stop()


async def test_run_releases_the_copy_and_counts_the_request_whatever_the_outcome(node: NodeParts) -> None:
    await node.register("m")
    entry = await node.replica.acquire("m", "")
    model = node.runtime.models["m@1"]
    model.errors.append(ValueError("bad tensor"))
    with pytest.raises(ValueError, match="bad tensor"):
        await node.replica.run(entry, pb.ModelInferRequest(model_name="m"), time.perf_counter())
    assert (entry.inflight, entry.requests) == (0, 1)
    entry = await node.replica.acquire("m", "")
    response = await node.replica.run(entry, pb.ModelInferRequest(model_name="m", id="r2"), time.perf_counter(),
                                      timeout_s=1.5)
    assert (response.model_name, response.model_version, response.id) == ("m", "1", "r2")
    assert model.requests == [("m", None), ("m", 1.5)]
    assert (entry.inflight, entry.requests) == (0, 2)
    assert (node.metrics.invoke_count, node.metrics.invoke_failures) == (2, 1)
    assert node.replica.has_copy("m", "")  # an ordinary failure keeps the copy


async def test_a_copy_the_runtime_lost_is_forgotten_and_loaded_again_by_the_next_request(node: NodeParts) -> None:
    await node.register("m")
    entry = await node.replica.acquire("m", "")
    node.runtime.models["m@1"].errors.append(ModelLost("model 'm' is gone from Triton"))
    with pytest.raises(ModelLost):
        await node.replica.run(entry, pb.ModelInferRequest(model_name="m"), time.perf_counter())
    assert not node.replica.has_copy("m", "") and entry.inflight == 0
    response = await node.replica.infer(pb.ModelInferRequest(model_name="m"))
    assert response.model_name == "m" and node.runtime.loads == ["m@1", "m@1"]


async def test_a_model_disabled_after_its_load_is_not_acquired_again(node: NodeParts) -> None:
    await node.register("m")
    await node.use("m")
    await node.registry.update("m", lambda r: replace(r, enabled=False) if r else None)
    with pytest.raises(ModelNotFound, match="^Request for unknown model: 'm' is not found$"):
        await node.replica.acquire("m", "")
    assert node.replica.has_copy("m", "")  # its copy goes when the node unloads it (Node._on_registry_change)
    assert node.replica.instance_id == ME
