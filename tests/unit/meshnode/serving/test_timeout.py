"""A model's inference timeout (ModelRecord.timeout_ms), applied by LocalReplica.run: the request ends with
DEADLINE_EXCEEDED naming the model, the copy is released once, other models go on being served, and the
client's shorter deadline keeps its own behaviour. Over the real replica, cache and registry (fake etcd),
with models whose infer waits at a gate; the last test runs real ONNX Runtime sessions in its worker pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest

from deploy.local import models as examples
from meshnode.control.registration import Registration
from meshnode.errors import DeadlineExceeded
from meshnode.observability.metrics import NodeMetrics
from meshnode.runtimes.base import CallerMetadata, LoadedModel
from meshnode.runtimes.onnx import OnnxModel, OnnxRuntime
from meshnode.serving import replica as replica_module
from meshnode.serving.cache import ModelCache
from meshnode.serving.dataplane import DataPlane
from meshnode.serving.replica import LocalReplica
from meshnode.serving.runtime_status import RuntimeStatus
from meshnode.state.registry import ModelRecord, Registry
from meshnode.storage.repository import ModelSource
from meshpb import pb
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import WAIT_S, FakeLoadedModel, FakeRouter, FakeRuntime, Log, NodeParts

pytestmark = pytest.mark.timeout(15)

MESSAGE = "inference of model 'slow' version 1 exceeded its timeout of {} ms"


@dataclass(eq=False)
class GatedModel(FakeLoadedModel):
    """A model whose every request waits until its gate opens; logs requests begun, abandoned and answered."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    begun: Log[str] = field(default_factory=Log)
    abandoned: Log[str] = field(default_factory=Log)
    answered: Log[str] = field(default_factory=Log)

    async def infer(self, request: pb.ModelInferRequest, timeout_s: float | None = None,
                    caller_metadata: CallerMetadata | None = None) -> pb.ModelInferResponse:
        self.begun.append(request.id)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.abandoned.append(request.id)
            raise
        response = await super().infer(request, timeout_s, caller_metadata)
        self.answered.append(request.id)
        return response


class GatedRuntime(FakeRuntime):
    """FakeRuntime whose models named in `gated` are GatedModels."""

    def __init__(self, *gated: str) -> None:
        super().__init__()
        self.gated = set(gated)

    async def load(self, source: ModelSource) -> LoadedModel:
        loaded = await super().load(source)
        if source.name not in self.gated:
            return loaded
        model = GatedModel(loaded.name, loaded.version, loaded.size_bytes)
        self.models[f"{source.name}@{source.version}"] = model
        return model


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeParts]:
    parts = await NodeParts(FakeStore(), tmp_path / "repo", runtime=GatedRuntime("slow")).start(mesh=False)
    yield parts
    await parts.stop()


def gated(node: NodeParts, name: str = "slow") -> GatedModel:
    model = node.runtime.models[f"{name}@1"]
    assert isinstance(model, GatedModel)
    return model


async def run(node: NodeParts, name: str, request_id: str, timeout_s: float | None = None) -> pb.ModelInferResponse:
    """One request as the dataplane's hit path makes it: acquire (a hit once loaded), then run and release."""
    entry = await node.replica.acquire(name, "")
    return await node.replica.run(entry, pb.ModelInferRequest(model_name=name, id=request_id), time.perf_counter(),
                                  timeout_s)


def no_asyncio_timeout(monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """Fails any asyncio.timeout the replica would enter; returns the delays it was asked for."""
    asked: list[float | None] = []

    def refuse(delay: float | None) -> Any:
        asked.append(delay)
        raise AssertionError("the replica entered an asyncio.timeout context")

    monkeypatch.setattr(replica_module, "asyncio", SimpleNamespace(timeout=refuse))  # the replica's asyncio only
    return asked


async def test_a_request_past_the_models_timeout_is_deadline_exceeded_naming_it_and_abandoned(
        node: NodeParts) -> None:
    await node.register("slow", timeout_ms=30)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as raised:
        await run(node, "slow", "r1")
    assert time.monotonic() - started < 1.0
    assert str(raised.value) == MESSAGE.format(30)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and not raised.value.retry_elsewhere
    model = gated(node)
    assert (model.begun, model.abandoned, model.answered) == (["r1"], ["r1"], [])  # the runtime's call cancelled
    entry = node.cache.ready[("slow", "")]
    assert (entry.inflight, entry.requests) == (0, 1)  # released, once
    assert (node.metrics.invoke_count, node.metrics.invoke_failures) == (1, 1)
    assert node.replica.has_copy("slow", "")  # a slow request says nothing against the copy
    model.gate.set()
    assert (await run(node, "slow", "r2")).id == "r2"  # the copy still serves
    assert (entry.inflight, entry.requests) == (0, 2) and node.runtime.loads == ["slow@1"]


async def test_a_cold_request_through_infer_is_bounded_too(node: NodeParts) -> None:
    await node.register("slow", timeout_ms=30)
    with pytest.raises(DeadlineExceeded, match=f"^{MESSAGE.format(30)}$"):
        await node.replica.infer(pb.ModelInferRequest(model_name="slow", id="cold"))
    assert node.cache.ready[("slow", "")].inflight == 0


async def test_other_models_are_served_while_one_runs_past_its_timeout(node: NodeParts) -> None:
    await node.register("slow", timeout_ms=300)
    await node.register("fast")
    await node.use("fast")
    await node.use("slow")
    slow = asyncio.create_task(run(node, "slow", "s"))
    await gated(node).begun.wait_len(1)
    answered = [(await run(node, "fast", f"f{i}")).id for i in range(20)]
    assert answered == [f"f{i}" for i in range(20)] and not slow.done()  # served while 'slow' still runs
    with pytest.raises(DeadlineExceeded, match=f"^{MESSAGE.format(300)}$"):
        await slow
    assert (await run(node, "fast", "after")).id == "after"
    assert node.cache.ready[("slow", "")].inflight == 0 and node.cache.ready[("fast", "")].inflight == 0


async def test_many_timed_out_requests_leave_no_request_in_flight_and_the_copy_unloads_at_once(
        node: NodeParts) -> None:
    await node.register("slow", timeout_ms=20)
    results = await asyncio.gather(*(run(node, "slow", f"r{i}") for i in range(10)), return_exceptions=True)
    assert all(isinstance(r, DeadlineExceeded) for r in results)
    entry = node.cache.ready[("slow", "")]
    assert (entry.inflight, entry.requests) == (0, 10)
    assert sorted(gated(node).abandoned) == sorted(f"r{i}" for i in range(10))
    # Nothing in flight: the unload does not wait for a drain.
    assert await asyncio.wait_for(node.cache.unload_model("slow"), 0.5) == 1
    assert node.runtime.unloads == ["slow@1"]


async def test_a_model_without_a_timeout_waits_as_long_as_it_runs_and_enters_no_timeout(
        node: NodeParts, monkeypatch: pytest.MonkeyPatch) -> None:
    await node.register("slow")
    await node.use("slow")
    asked = no_asyncio_timeout(monkeypatch)
    request = asyncio.create_task(run(node, "slow", "r1", timeout_s=None))
    await gated(node).begun.wait_len(1)
    await asyncio.sleep(0.1)
    assert not request.done()
    gated(node).gate.set()
    assert (await request).id == "r1" and asked == []


async def test_when_the_clients_deadline_is_shorter_it_bounds_the_request_as_before(
        node: NodeParts, monkeypatch: pytest.MonkeyPatch) -> None:
    await node.register("slow", timeout_ms=5_000)
    await node.use("slow")
    asked = no_asyncio_timeout(monkeypatch)
    model = gated(node)
    model.gate.set()
    assert (await run(node, "slow", "r1", timeout_s=0.25)).id == "r1"
    # The runtime's own deadline error (Triton's) passes unchanged: no model timeout message.
    model.errors.append(DeadlineExceeded("model 'slow' on Triton at t:8001 ran out of time: Deadline Exceeded"))
    with pytest.raises(DeadlineExceeded, match="on Triton at t:8001 ran out of time"):
        await run(node, "slow", "r2", timeout_s=5.0)  # equal to the model's: the client's stands
    assert asked == [] and model.requests == [("slow", 0.25), ("slow", 5.0)]


async def test_the_model_timeout_bounds_a_longer_client_deadline_which_the_runtime_still_gets(
        node: NodeParts) -> None:
    await node.register("slow", timeout_ms=30)
    await node.use("slow")
    with pytest.raises(DeadlineExceeded, match=f"^{MESSAGE.format(30)}$"):
        await run(node, "slow", "r1", timeout_s=10.0)
    model = gated(node)
    model.gate.set()
    assert (await run(node, "slow", "r2", timeout_s=10.0)).id == "r2"
    assert model.requests == [("slow", 10.0)]  # the runtime's call is bounded by the client's deadline, as before


async def test_a_timeout_error_of_the_runtime_itself_is_not_taken_for_the_models_timeout(node: NodeParts) -> None:
    await node.register("slow", timeout_ms=5_000)
    await node.use("slow")
    model = gated(node)
    model.gate.set()
    model.errors.append(TimeoutError("the runtime's own"))
    with pytest.raises(TimeoutError, match="^the runtime's own$"):
        await run(node, "slow", "r1")


async def test_a_re_registration_changes_the_timeout_of_the_loaded_copy_without_reloading_it(
        node: NodeParts) -> None:
    await node.register("slow")
    await node.control.register(Registration("slow"))  # loads it, without a timeout
    await node.control.register(Registration("slow", timeout_ms=30))  # same storage: no reload
    assert node.record("slow").timeout_ms == 30
    with pytest.raises(DeadlineExceeded, match=f"^{MESSAGE.format(30)}$"):
        await run(node, "slow", "r1")
    await node.control.register(Registration("slow", pinned=True))  # a field left out keeps its value
    assert node.record("slow").timeout_ms == 30
    # Any change of the record in the view counts, e.g. another node's registration arriving by the watch.
    await node.registry.update("slow", lambda r: replace(r, timeout_ms=40) if r else None)
    with pytest.raises(DeadlineExceeded, match=f"^{MESSAGE.format(40)}$"):
        await run(node, "slow", "r2")
    # A request keeps the limit it started with.
    bounded = asyncio.create_task(run(node, "slow", "r3"))
    await gated(node).begun.wait_len(3)
    await node.registry.update("slow", lambda r: replace(r, timeout_ms=None) if r else None)
    with pytest.raises(DeadlineExceeded, match=f"^{MESSAGE.format(40)}$"):
        await bounded
    unlimited = asyncio.create_task(run(node, "slow", "r4"))
    await asyncio.sleep(0.1)
    assert not unlimited.done()
    gated(node).gate.set()
    assert (await unlimited).id == "r4"
    assert node.runtime.loads == ["slow@1"]  # never reloaded
    assert node.cache.ready[("slow", "")].inflight == 0


async def test_through_the_dataplane_an_alias_hit_past_the_timeout_names_the_model_and_is_not_rerouted(
        tmp_path: Path) -> None:
    node = await NodeParts(FakeStore(), tmp_path / "repo", runtime=GatedRuntime("slow")).start(mesh=False)
    try:
        router = FakeRouter()
        dataplane = DataPlane(replica=node.replica, router=router.router, cache=node.cache, registry=node.registry,
                              alias_targets={"front": "slow"}, metadata_elsewhere=_no_metadata,
                              metrics=node.metrics, version="1")
        await node.register("slow", timeout_ms=30)
        await node.use("slow")
        with pytest.raises(DeadlineExceeded, match=f"^{MESSAGE.format(30)}$"):
            await dataplane.infer(pb.ModelInferRequest(model_name="front"), time_remaining=lambda: 60.0)
        assert router.routed == [] and dataplane.inflight == 0
        assert node.cache.ready[("slow", "")].inflight == 0
    finally:
        await node.stop()


async def _no_metadata(name: str, version: str) -> pb.ModelMetadataResponse | None:
    return None


# -- ONNX Runtime: the session run goes on in its worker thread; the pool is not clogged -----------------


async def test_onnx_runs_abandoned_past_the_timeout_do_not_clog_the_worker_pool(tmp_path: Path) -> None:
    store, metrics = FakeStore(), NodeMetrics()
    runtime = OnnxRuntime(infer_workers=1)  # one worker: an abandoned run holds the whole pool while it lasts
    cache = ModelCache(runtime, capacity_bytes=1 << 30, metrics=metrics, load_timeout_s=30.0,
                       failure_backoff_s=30.0, churn_guard_s=0.0)
    registry = Registry(store.etcd)
    replica = LocalReplica(instance_id="me", registry=registry, cache=cache, runtime=runtime, metrics=metrics,
                           status=RuntimeStatus())
    await registry.start()
    try:
        width = 1024  # 8 MatMuls of 1024 x 1024: ~0.2 s on one core here
        slow_dir = examples.write_matmul_chain(tmp_path, "slow", width=width, depth=8)
        fast_dir = examples.write_mlp(tmp_path, "fast", approx_bytes=8_000)
        await registry.update("slow", lambda _: ModelRecord(name="slow", storage=str(slow_dir), timeout_ms=20))
        await registry.update("fast", lambda _: ModelRecord(name="fast", storage=str(fast_dir)))
        slow_entry = await replica.acquire("slow", "")
        cache.release(slow_entry)
        slow = slow_entry.model
        assert isinstance(slow, OnnxModel)

        def request(name: str, columns: int, request_id: str) -> pb.ModelInferRequest:
            data = np.ones((1, columns), np.float32)
            return pb.ModelInferRequest(
                model_name=name, id=request_id, raw_input_contents=[data.tobytes()],
                inputs=[pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, columns])])

        async def infer(name: str, columns: int, request_id: str) -> pb.ModelInferResponse:
            return await replica.infer(request(name, columns, request_id))

        results = await asyncio.gather(*(infer("slow", width, f"s{i}") for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, DeadlineExceeded) for r in results), results
        assert slow._probed == 0  # answered at the timeout, while the first run still goes on
        assert slow_entry.inflight == 0
        # The first run was told to terminate and the two queued behind it were cancelled before they ran, so
        # the next request (another model's) gets the one worker without a slow run ending first.
        answered = await asyncio.wait_for(infer("fast", 16, "f"), WAIT_S)
        assert answered.id == "f" and answered.model_name == "fast"
        assert slow._probed == 0  # no run of 'slow' ran to its end: the one it started was stopped
        # The copy serves again once its timeout allows it.
        await registry.update("slow", lambda r: replace(r, timeout_ms=None) if r else None)
        assert (await asyncio.wait_for(infer("slow", width, "s-ok"), WAIT_S)).id == "s-ok"
        assert slow_entry.inflight == 0 and slow._probed == 1
    finally:
        await cache.close()
        await registry.stop()
        await runtime.close()
