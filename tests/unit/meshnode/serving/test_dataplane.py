"""DataPlane over the real replica, cache and registry, with a fake router and a fake source of remote metadata."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshnode.errors import InvalidInput, LoadFailed, ModelLost, ModelNotFound
from meshnode.serving.dataplane import SERVER_EXTENSIONS, TRIED_ALREADY, DataPlane, check_version
from meshnode.state.registry import Copy, ModelRecord
from meshpb import pb
from placement.types import LOADED
from router.hop import HOPS_KEY, MODE_KEY, PARAMETER_KEY, TRIED_KEY, Hop, Mode
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import NOW, FakeRouter, LoadPlan, NodeParts, Routed

pytestmark = pytest.mark.timeout(10)

TRACEPARENT = ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
TENSOR = pb.ModelMetadataResponse.TensorMetadata


@dataclass
class Elsewhere:
    """dataplane.MetadataElsewhere: what a copy on another node would answer (None: the mesh has none)."""

    answer: pb.ModelMetadataResponse | None = None
    calls: list[tuple[str, str]] = field(default_factory=list)

    async def __call__(self, name: str, version: str) -> pb.ModelMetadataResponse | None:
        self.calls.append((name, version))
        if self.answer is None:
            return None
        found = pb.ModelMetadataResponse()
        found.CopyFrom(self.answer)
        return found


@dataclass
class CallerMetadata:
    """The gRPC invocation metadata of the call; counts reads (the hit path must not read it)."""

    entries: tuple[tuple[str, str], ...] = ()
    reads: int = 0

    def __call__(self) -> Iterable[tuple[str, str]]:
        self.reads += 1
        return self.entries


@dataclass
class Plane:
    node: NodeParts
    router: FakeRouter
    elsewhere: Elsewhere
    aliases: dict[str, str]
    dataplane: DataPlane


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    node = await NodeParts(FakeStore(), tmp_path / "repo").start(mesh=False)
    router, elsewhere, aliases = FakeRouter(), Elsewhere(), {"front": "m"}
    dataplane = DataPlane(replica=node.replica, router=router.router, cache=node.cache, registry=node.registry,
                          alias_targets=aliases, metadata_elsewhere=elsewhere, metrics=node.metrics, version="1.2.3")
    yield Plane(node, router, elsewhere, aliases, dataplane)
    await node.stop()


def hop_parameter(request: pb.ModelInferRequest, hop: Hop) -> pb.ModelInferRequest:
    request.parameters[PARAMETER_KEY].string_param = hop.encode()
    return request


# -- infer ------------------------------------------------------------------------------------------


async def test_a_hit_runs_on_the_local_copy_without_the_router_or_reading_metadata(plane: Plane) -> None:
    node = plane.node
    await node.register("m")
    await node.use("m")
    metadata = CallerMetadata((TRACEPARENT,))
    response = await plane.dataplane.infer(pb.ModelInferRequest(model_name="m", id="r1"), metadata, lambda: 2.5)
    assert (response.model_name, response.model_version, response.id) == ("m", "1", "r1")
    assert plane.router.routed == [] and metadata.reads == 0
    assert node.runtime.models["m@1"].requests == [("m", 2.5)]  # the time left of the client's deadline
    entry = node.cache.ready[("m", "")]
    assert (entry.inflight, entry.requests, plane.dataplane.inflight) == (0, 2, 0)
    assert (node.metrics.api_requests, node.metrics.cache_hits, node.metrics.invoke_count) == (1, 1, 1)


async def test_an_alias_is_served_by_its_models_copy_and_answered_in_its_models_name(plane: Plane) -> None:
    await plane.node.register("m")
    await plane.node.use("m")
    response = await plane.dataplane.infer(pb.ModelInferRequest(model_name="front"))
    assert response.model_name == "m" and plane.router.routed == []


async def test_a_miss_for_an_alias_is_routed_as_its_model(plane: Plane) -> None:
    response = await plane.dataplane.infer(pb.ModelInferRequest(model_name="front", model_version="2"))
    assert response.id == "routed"
    assert plane.router.routed == [Routed("m", "2", Hop(), None)]


async def test_a_miss_goes_to_the_router_with_the_hop_the_peer_sent_and_the_callers_trace(plane: Plane) -> None:
    sent = Hop(hops=1, tried=("n1", "n2"), mode=Mode.COPY)
    request = hop_parameter(pb.ModelInferRequest(model_name="m"), sent)
    metadata = CallerMetadata((TRACEPARENT, ("user-agent", "grpc-python")))
    await plane.dataplane.infer(request, metadata, lambda: 3.0)
    assert plane.router.routed == [Routed("m", "", Hop(1, ("n1", "n2"), Mode.COPY, (TRACEPARENT,)), 3.0)]
    assert plane.dataplane.inflight == 0 and plane.node.metrics.api_requests == 1


async def test_a_miss_skips_the_peers_a_forward_outside_the_router_tried_already(plane: Plane) -> None:
    token = TRIED_ALREADY.set(("n3",))
    try:
        await plane.dataplane.infer(pb.ModelInferRequest(model_name="m"), CallerMetadata((TRACEPARENT,)))
    finally:
        TRIED_ALREADY.reset(token)
    assert plane.router.routed == [Routed("m", "", Hop(tried=("n3",), propagated=(TRACEPARENT,)), None)]


async def test_a_miss_reads_the_hop_from_metadata_when_the_request_carries_none(plane: Plane) -> None:
    metadata = CallerMetadata(((HOPS_KEY, "1"), (TRIED_KEY, "n1"), (MODE_KEY, "load")))
    await plane.dataplane.infer(pb.ModelInferRequest(model_name="m"), metadata)
    assert plane.router.routed == [Routed("m", "", Hop(1, ("n1",), Mode.LOAD), None)]


async def test_a_malformed_hop_reads_as_a_fresh_client_request(plane: Plane) -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.parameters[PARAMETER_KEY].string_param = "lots|copy|n1"
    await plane.dataplane.infer(request, CallerMetadata((TRACEPARENT,)))
    assert plane.router.routed == [Routed("m", "", Hop(propagated=(TRACEPARENT,)), None)]


async def test_a_hit_on_a_copy_the_runtime_lost_falls_through_to_the_router(plane: Plane) -> None:
    node = plane.node
    await node.register("m")
    await node.use("m")
    node.runtime.models["m@1"].errors.append(ModelLost("model 'm' is not loaded in Triton"))
    response = await plane.dataplane.infer(pb.ModelInferRequest(model_name="m"), CallerMetadata(), lambda: 4.0)
    assert response.id == "routed"
    assert plane.router.routed == [Routed("m", "", Hop(), 4.0)]
    assert not node.cache.has_entry("m", "") and node.cache.ready == {}  # forgotten: the router loads it again
    await node.runtime.unloads.wait_len(1)
    assert node.runtime.unloads == ["m@1"]
    assert (node.metrics.invoke_failures, node.metrics.cache_hits, plane.dataplane.inflight) == (1, 1, 0)


async def test_any_other_error_on_a_hit_is_the_callers_and_the_copy_stays(plane: Plane) -> None:
    await plane.node.register("m")
    await plane.node.use("m")
    plane.node.runtime.models["m@1"].errors.append(InvalidInput("input 'INPUT0' must be FP32"))
    with pytest.raises(InvalidInput, match="INPUT0"):
        await plane.dataplane.infer(pb.ModelInferRequest(model_name="m"))
    assert plane.router.routed == [] and plane.node.cache.has_entry("m", "") and plane.dataplane.inflight == 0


@pytest.mark.parametrize(("version", "message"), [
    ("wrong_specification", "failed to get model version from specified version string 'wrong_specification' "
                            "(details: stol), version should be an integral value > 0"),
    ("99999999999999999999", "failed to get model version from specified version string '99999999999999999999' "
                             "(details: stol), version should be an integral value > 0"),
    ("-3", "invalid model version specified '-3' , version should be an integral value > 0"),
])
async def test_a_version_string_that_is_no_version_gets_tritons_words_before_any_routing(
    plane: Plane, version: str, message: str,
) -> None:
    with pytest.raises(InvalidInput) as caught:
        await plane.dataplane.infer(pb.ModelInferRequest(model_name="m", model_version=version))
    assert str(caught.value) == message and plane.router.routed == []
    with pytest.raises(InvalidInput, match="^" + message.split(" '")[0]):
        await plane.dataplane.model_metadata("m", version)


async def test_a_version_as_triton_parses_it_is_routed() -> None:
    for version in ("", "2", " 3", "+4", "5th"):  # std::stol reads the leading digits, as Triton does
        check_version(version)


async def test_the_node_that_failed_is_named_on_the_error_not_in_its_message(plane: Plane) -> None:
    with pytest.raises(InvalidInput) as caught:
        await plane.dataplane.infer(pb.ModelInferRequest(model_name="m", model_version="x"))
    assert caught.value.node == plane.node.instance_id and plane.node.instance_id not in str(caught.value)


# -- readiness ----------------------------------------------------------------------------------------


async def test_model_ready_says_whether_a_request_would_be_served_now(plane: Plane, tmp_path: Path) -> None:
    node = plane.node
    await node.register("m")
    await node.use("m")
    await node.register("idle", versions=("1", "2"))
    await node.register("off", enabled=False)
    elsewhere = ModelRecord(name="elsewhere", storage=str(tmp_path / "not-on-this-node"),
                            copies={"n2": Copy(state=LOADED, since=NOW)})
    assert await node.registry.register_if_absent(elsewhere)
    await node.register("failing")
    node.runtime.plan("failing", LoadPlan(error=LoadFailed("corrupt")))
    with pytest.raises(LoadFailed):
        await node.use("failing")
    asked = [("m", ""), ("front", ""), ("idle", ""), ("idle", "2"), ("idle", "3"), ("off", ""), ("ghost", ""),
             ("elsewhere", ""), ("elsewhere", "1"), ("failing", ""), ("failing", "1")]
    assert {f"{n}:{v}": plane.dataplane.model_ready(n, v) for n, v in asked} == {
        "m:": True, "front:": True,  # a copy here, by name or by alias
        "idle:": True, "idle:2": True, "idle:3": False,  # loadable: the version is in its storage
        "off:": False, "ghost:": False,  # unloaded, or never registered
        "elsewhere:": True, "elsewhere:1": False,  # a loaded copy in the mesh serves the latest, not a version
        "failing:": False, "failing:1": False,  # failed here recently
    }
    node.clock.advance(31.0)  # the failure's backoff is over: it would be tried again
    assert plane.dataplane.model_ready("failing", "")


async def test_server_readiness_follows_set_ready(plane: Plane) -> None:
    assert plane.dataplane.ready is False
    plane.dataplane.set_ready(True)
    assert plane.dataplane.ready is True
    plane.dataplane.set_ready(False)
    assert plane.dataplane.ready is False


# -- metadata --------------------------------------------------------------------------------------------


def local_metadata(name: str, versions: list[str]) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(name=name, versions=versions, platform="onnxruntime_onnx",
                                    inputs=[TENSOR(name="INPUT0", datatype="FP32", shape=[-1, 16])],
                                    outputs=[TENSOR(name="OUTPUT0", datatype="FP32", shape=[-1, 4])])


async def test_metadata_comes_from_a_copy_elsewhere_without_loading_here(plane: Plane) -> None:
    await plane.node.register("m")
    plane.elsewhere.answer = pb.ModelMetadataResponse(name="m", versions=["1"], platform="remote")
    assert await plane.dataplane.model_metadata("m", "1") == plane.elsewhere.answer
    assert plane.elsewhere.calls == [("m", "1")] and plane.node.runtime.loads == []


async def test_metadata_loads_here_when_the_mesh_has_no_copy_to_ask(plane: Plane) -> None:
    await plane.node.register("m", versions=("1", "2"))
    assert await plane.dataplane.model_metadata("m", "") == local_metadata("m", ["1", "2"])
    assert plane.elsewhere.calls == [("m", "")] and plane.node.runtime.loads == ["m@2"]
    entry = plane.node.cache.ready[("m", "")]
    assert entry.inflight == 0  # released


async def test_metadata_of_a_copy_here_is_answered_here(plane: Plane) -> None:
    await plane.node.register("m")
    await plane.node.use("m")
    plane.elsewhere.answer = pb.ModelMetadataResponse(name="m", platform="remote")
    assert await plane.dataplane.model_metadata("m", "") == local_metadata("m", ["1"])
    assert plane.elsewhere.calls == [] and plane.node.runtime.loads == ["m@1"]


async def test_forwarded_metadata_is_never_asked_of_the_mesh_again(plane: Plane) -> None:
    await plane.node.register("m")
    plane.elsewhere.answer = pb.ModelMetadataResponse(name="m", platform="remote")
    assert await plane.dataplane.model_metadata("m", "", forwarded=True) == local_metadata("m", ["1"])
    assert plane.elsewhere.calls == []


async def test_metadata_of_an_alias_names_the_alias(plane: Plane) -> None:
    await plane.node.register("m")
    plane.elsewhere.answer = pb.ModelMetadataResponse(name="m", platform="remote")
    assert await plane.dataplane.model_metadata("front", "") == pb.ModelMetadataResponse(name="front",
                                                                                          platform="remote")
    assert plane.elsewhere.calls == [("m", "")]
    plane.elsewhere.answer = None
    assert await plane.dataplane.model_metadata("front", "") == local_metadata("front", ["1"])


async def test_metadata_of_an_unknown_model_is_not_found(plane: Plane) -> None:
    with pytest.raises(ModelNotFound, match="^Request for unknown model: 'ghost' is not found$"):
        await plane.dataplane.model_metadata("ghost", "")


async def test_server_metadata_names_the_server_its_version_and_extensions(plane: Plane) -> None:
    assert plane.dataplane.server_metadata() == pb.ServerMetadataResponse(
        name="meshserve", version="1.2.3", extensions=list(SERVER_EXTENSIONS))
    assert SERVER_EXTENSIONS == ("model_repository", "model_repository(unload_dependents)", "parameters")


@pytest.mark.parametrize(("left_s", "code"), [(0.0, "DEADLINE_EXCEEDED"), (-0.2, "DEADLINE_EXCEEDED"),
                                              (5.0, "CANCELLED"), (None, "CANCELLED")])
async def test_a_request_ended_under_it_counts_as_its_client_was_told(
        plane: Plane, monkeypatch: pytest.MonkeyPatch, left_s: float | None, code: str) -> None:
    routing = asyncio.Event()

    async def forever(*args: object, **kwargs: object) -> pb.ModelInferResponse:
        routing.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(plane.router, "route", forever)
    task = asyncio.create_task(plane.dataplane.infer(pb.ModelInferRequest(model_name="m"), None, lambda: left_s))
    await routing.wait()
    task.cancel()  # the call ended: its deadline passed, or its client cancelled
    with pytest.raises(asyncio.CancelledError):
        await task
    counted = {tuple(sorted(s.labels.items())): s.value
               for family in text_string_to_metric_families(plane.node.metrics.render().decode())
               for s in family.samples if s.name == "modelmesh_api_request_milliseconds_count"}
    assert counted == {(("code", code), ("method", "ModelInfer")): 1}
