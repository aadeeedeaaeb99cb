"""Fakes under the node's parts, so the real parts run in-process: a runtime, peers, a router, a clock.

- The in-memory etcd (FakeStore) is in tests.unit.meshnode.fake_etcd.
- FakeRuntime / FakeLoadedModel: loads with scripted sizes, errors and gates; every load and unload logged.
- FakePeers: what GrpcPeers does for the copy manager, the drain and metadata, scripted per node.
- NodeParts: the parts of one node built as meshnode.node.Node builds them, over these fakes.

Nothing here sleeps for a fixed time: a test waits for what it expects with Log.wait / FakeStore.settle.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
import pytest

from meshnode.control.model_control import ModelControl
from meshnode.mesh.copy_manager import CopyManager
from meshnode.mesh.state import MeshState
from meshnode.net.peers import GrpcPeers
from meshnode.observability.metrics import NodeMetrics
from meshnode.runtimes.base import CallerMetadata, LoadedModel, TensorSpec
from meshnode.serving.cache import ModelCache
from meshnode.serving.replica import LocalReplica
from meshnode.serving.runtime_status import RuntimeStatus
from meshnode.state.aliases import Aliases
from meshnode.state.registry import ModelRecord, Registry
from meshnode.storage.locations import Locations
from meshnode.storage.remote import ObjectStore
from meshnode.storage.repository import ModelRepository, ModelSource
from meshnode.storage.uris import StoreOptions
from meshpb import pb
from placement.copies import CopyConfig
from placement.types import NodeView
from router.errors import MeshError, PeerError
from router.hop import Hop
from router.router import Router

if TYPE_CHECKING:  # fake_etcd imports Log and WAIT_S from here
    from tests.unit.meshnode.fake_etcd import FakeStore

T = TypeVar("T")

ME = "me"
NOW = 1_700_000_000.0
SIZE = 100  # bytes of a fake model, predicted and measured, unless a test says otherwise
WAIT_S = 2.0  # how long a test waits for something it expects (tests fail fast, never hang)


class ManualClock:
    """A wall clock that moves only when the test moves it."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Log(list[T]):
    """Things that happened, in order (a list), and a way to wait until enough of them did."""

    def __init__(self, items: Iterable[T] = ()) -> None:
        super().__init__(items)
        self._changed = asyncio.Event()

    def append(self, item: T) -> None:
        super().append(item)
        self._changed.set()

    async def wait(self, predicate: Callable[[list[T]], bool], timeout: float = WAIT_S) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

    async def wait_len(self, n: int, timeout: float = WAIT_S) -> None:  # noqa: ASYNC109
        await self.wait(lambda items: len(items) >= n, timeout)


# -- the runtime ----------------------------------------------------------------------------------

INPUTS = (TensorSpec("INPUT0", "FP32", (-1, 16)),)
OUTPUTS = (TensorSpec("OUTPUT0", "FP32", (-1, 4)),)


@dataclass(eq=False)
class FakeLoadedModel:
    name: str
    version: str
    size_bytes: int
    platform: str = "onnxruntime_onnx"
    inputs: tuple[TensorSpec, ...] = INPUTS
    outputs: tuple[TensorSpec, ...] = OUTPUTS
    errors: list[BaseException] = field(default_factory=list)  # raised by the next requests, in order
    requests: Log[tuple[str, float | None]] = field(default_factory=Log)  # (model name asked for, timeout_s)
    gate: asyncio.Event | None = None  # requests block until it is set (a slow model, a full queue)

    async def infer(self, request: pb.ModelInferRequest, timeout_s: float | None = None,
                    caller_metadata: CallerMetadata | None = None) -> pb.ModelInferResponse:
        self.requests.append((request.model_name, timeout_s))
        if self.gate is not None:
            await self.gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        return pb.ModelInferResponse(model_name=self.name, model_version=self.version, id=request.id)


@dataclass
class LoadPlan:
    """How the next load of a model goes."""

    size_bytes: int = SIZE
    error: BaseException | None = None
    gate: asyncio.Event | None = None  # the load finishes only once this is set
    infer_gate: asyncio.Event | None = None  # the loaded model's requests block until this is set


class FakeRuntime:
    def __init__(self, name: str = "onnxruntime", *, predicted: int = SIZE, size: int = SIZE) -> None:
        self.name = name
        self.answers = True  # what healthy() says
        self.starts = 0
        self.predicted: dict[str, int] = {}  # by model name; else `predicted`
        self.sizes: dict[str, int] = {}  # measured, by model name; else `size`
        self._default_predicted = predicted
        self._default_size = size
        self._plans: dict[str, list[LoadPlan]] = {}
        self.predictions: list[str] = []
        self.loads: Log[str] = Log()  # "name@version" as each load starts
        self.unloads: Log[str] = Log()
        self.models: dict[str, FakeLoadedModel] = {}  # the last model loaded, by "name@version"

    def plan(self, name: str, *plans: LoadPlan) -> None:
        """The next loads of `name` go as planned, in order; then as `sizes` says."""
        self._plans.setdefault(name, []).extend(plans)

    async def start(self) -> None:
        self.starts += 1

    async def healthy(self) -> bool:
        return self.answers

    def predict_size(self, source: ModelSource) -> int:
        self.predictions.append(source.name)
        return self.predicted.get(source.name, self._default_predicted)

    async def load(self, source: ModelSource) -> LoadedModel:
        key = f"{source.name}@{source.version}"
        self.loads.append(key)
        plans = self._plans.get(source.name)
        plan = plans.pop(0) if plans else LoadPlan(self.sizes.get(source.name, self._default_size))
        if plan.gate is not None:
            await plan.gate.wait()
        if plan.error is not None:
            raise plan.error
        model = FakeLoadedModel(source.name, source.version, plan.size_bytes, gate=plan.infer_gate)
        self.models[key] = model
        return model

    async def unload(self, model: LoadedModel) -> None:
        self.unloads.append(f"{model.name}@{model.version}")

    async def close(self) -> None:
        pass


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    """The error an awaited gRPC call fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return failed.value


def source(name: str, version: str = "1") -> ModelSource:
    """A model version's files, as the cache sees them (it never reads them: the runtime does)."""
    directory = Path("/models") / name / version
    return ModelSource(name, version, directory, directory / "model.onnx")


def write_model(root: Path, name: str, versions: Iterable[str] = ("1",), content: bytes = b"onnx") -> Path:
    """A Triton-layout model directory ROOT/NAME/VERSION/model.onnx serving every version written (Triton's
    default policy would serve only the latest); returns ROOT/NAME."""
    for version in versions:
        directory = root / name / version
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "model.onnx").write_bytes(content)
    (root / name / "config.pbtxt").write_text("version_policy: { all { } }\n")
    return root / name


# -- peers and the router -------------------------------------------------------------------------


def peer_error(node: str, why: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> PeerError:
    return PeerError(code, f"node {node}: {why}", retry_elsewhere=True)


class FakePeers:
    """GrpcPeers' calls to other nodes, scripted per node, each call logged."""

    def __init__(self) -> None:
        self.loads: Log[tuple[str, str]] = Log()  # (node, model) per load_copy
        self.load_errors: dict[str, list[MeshError]] = {}  # per node: raised by its next load_copy calls
        # What the peer does once it loaded (its copy flusher records the copy): (node, model) -> None.
        self.on_load: Callable[[str, str], Awaitable[None]] | None = None
        self.ready_answers: dict[str, bool] = {}  # per node; True unless said
        self.on_ready: Callable[[str], Awaitable[None]] | None = None  # what happens while a node answers
        self.ready_calls: Log[str] = Log()
        self.metadata_answers: dict[str, pb.ModelMetadataResponse | MeshError] = {}
        self.metadata_calls: Log[tuple[str, str, str]] = Log()  # (node, model, version)
        self.forgotten: list[str] = []

    @property
    def grpc(self) -> GrpcPeers:
        """This fake where the parts' signatures say GrpcPeers."""
        return cast(GrpcPeers, self)

    async def load_copy(self, node: NodeView, name: str, budget_s: float) -> None:
        self.loads.append((node.instance_id, name))
        errors = self.load_errors.get(node.instance_id)
        if errors:
            raise errors.pop(0) if len(errors) > 1 else errors[0]
        if self.on_load is not None:
            await self.on_load(node.instance_id, name)

    async def ready(self, node: NodeView, budget_s: float = 2.0) -> bool:
        self.ready_calls.append(node.instance_id)
        if self.on_ready is not None:
            await self.on_ready(node.instance_id)
        return self.ready_answers.get(node.instance_id, True)

    async def metadata(self, node: NodeView, name: str, version: str, budget_s: float = 5.0) -> Any:
        self.metadata_calls.append((node.instance_id, name, version))
        answer = self.metadata_answers.get(node.instance_id)
        if answer is None:
            raise peer_error(node.instance_id, "connection refused")
        if isinstance(answer, MeshError):
            raise answer
        return answer

    def forget(self, instance_id: str) -> None:
        self.forgotten.append(instance_id)


@dataclass(frozen=True)
class Routed:
    model_name: str
    model_version: str
    hop: Hop
    budget_s: float | None
    overloaded_here: str | None = None  # the message of the local copy's refusal, when it was at its bound


class FakeRouter:
    """router.router.Router as the dataplane calls it: logs each miss and answers for the mesh."""

    def __init__(self) -> None:
        self.routed: list[Routed] = []

    @property
    def router(self) -> Router:
        """This fake where the parts' signatures say Router."""
        return cast(Router, self)

    async def route(self, request: pb.ModelInferRequest, hop: Hop, budget_s: float | None,
                    overloaded_here: MeshError | None = None, serve: object = None,
                    sequence: object = None) -> pb.ModelInferResponse:
        self.routed.append(Routed(request.model_name, request.model_version, hop, budget_s,
                                  None if overloaded_here is None else str(overloaded_here)))
        return pb.ModelInferResponse(model_name=request.model_name, id="routed")


# -- one node -------------------------------------------------------------------------------------


def copy_state(record: ModelRecord, instance_id: str) -> str | None:
    """The state of the node's copy in the record (placement.types.LOADING or LOADED), None without one."""
    copy = record.copies.get(instance_id)
    return None if copy is None else copy["state"]


def node_view(instance_id: str, *, capacity: int = 10_000, used: int = 0, shutting_down: bool = False,
              runtime: str = "") -> NodeView:
    return NodeView(instance_id=instance_id, endpoint=f"{instance_id}:8033", capacity_bytes=capacity, used_bytes=used,
                    shutting_down=shutting_down, runtime=runtime)


class NodeParts:
    """The parts of one node as meshnode.node.Node builds them, over fakes: no etcd, network or runtime.

    Its aliases are created and started too, so its control refuses what an alias needs.
    """

    def __init__(self, store: FakeStore, repository: Path, *, instance_id: str = ME, capacity: int = 1_000,
                 runtime: FakeRuntime | None = None, clock: ManualClock | None = None,
                 load_timeout_s: float = 5.0, failure_backoff_s: float = 30.0, churn_guard_s: float = 0.0,
                 copy_config: CopyConfig | None = None, runs_per_copy: int = 2, max_queued: int = 32) -> None:
        self.store = store
        self.instance_id = instance_id
        self.clock = clock or ManualClock()
        self.runtime = runtime or FakeRuntime()
        self.metrics = NodeMetrics()
        self.cache = ModelCache(self.runtime, capacity_bytes=capacity, metrics=self.metrics,
                                load_timeout_s=load_timeout_s, failure_backoff_s=failure_backoff_s,
                                churn_guard_s=churn_guard_s, runs_per_copy=runs_per_copy, max_queued=max_queued,
                                wall_clock=self.clock)
        self.registry = Registry(store.etcd)
        self.aliases = Aliases(store.etcd)
        self.peers = FakePeers()
        self.mesh = MeshState(store.etcd, self.registry, self.cache, self.runtime, instance_id,
                              on_node_gone=self.peers.forget, clock=self.clock)
        self.runtime_status = RuntimeStatus()
        self.replica = LocalReplica(instance_id=instance_id, registry=self.registry, cache=self.cache,
                                    runtime=self.runtime, metrics=self.metrics, status=self.runtime_status)
        self.copies = CopyManager(cache=self.cache, mesh=self.mesh, registry=self.registry, peers=self.peers.grpc,
                                  replica=self.replica, config=copy_config or CopyConfig(), interval_s=3600.0,
                                  proactive=False, clock=self.clock, rng=random.Random(7))
        self.repository = repository
        self.control = ModelControl(registry=self.registry, repository=ModelRepository(repository),
                                    locations=Locations(ObjectStore(StoreOptions()), str(repository)), cache=self.cache,
                                    replica=self.replica, mesh=self.mesh, aliases=self.aliases, copies=self.copies,
                                    runtime=self.runtime.name)
        self._mesh_started = False

    async def start(self, *, mesh: bool = True) -> NodeParts:
        await self.registry.start()
        await self.aliases.start()
        if mesh:
            await self.mesh.start()
            self._mesh_started = True
        return self

    async def stop(self) -> None:
        await self.copies.stop()
        if self._mesh_started:
            await self.mesh.stop()
        await self.cache.close()
        await self.registry.stop()
        await self.aliases.stop()

    async def register(self, name: str, *, versions: Iterable[str] = ("1",), **fields: Any) -> ModelRecord:
        """A model with files in the repository, registered (as the startup scan or a load does)."""
        record = ModelRecord(name=name, storage=str(write_model(self.repository, name, versions)), **fields)
        await self.registry.update(name, lambda _old: record)
        found = self.registry.get(name)
        assert found is not None
        return found

    async def use(self, name: str, version: str = "", times: int = 1) -> None:
        """Requests served here (loading the model if needed): acquire and release."""
        for _ in range(times):
            entry = await self.replica.acquire(name, version)
            self.cache.release(entry)

    def record(self, name: str) -> ModelRecord:
        """The model's record in this node's view (which must have it)."""
        found = self.registry.get(name)
        assert found is not None, f"model '{name}' is not registered"
        return found

    async def recorded(self, name: str, predicate: Callable[[ModelRecord], bool],
                       timeout: float = WAIT_S) -> ModelRecord:  # noqa: ASYNC109
        """The model's record once the registry view satisfies `predicate`."""
        found = await self.registry.wait_for(name, lambda r: r is not None and predicate(r), timeout)
        assert found is not None
        return found
