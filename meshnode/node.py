"""Composition root: builds the node's parts, wires them, starts and stops them."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import sys
import time
from importlib.metadata import PackageNotFoundError, version

from meshnode.api.inference import InferenceServicer
from meshnode.api.management import ManagementServicer
from meshnode.background import BackgroundTasks
from meshnode.control.alias_retirement import Retirement
from meshnode.control.alias_switch import AliasSwitch
from meshnode.control.management import Management
from meshnode.control.model_control import PARAM_UNREGISTER, ModelControl
from meshnode.etcd.store import EtcdStore
from meshnode.mesh.copy_manager import CopyManager
from meshnode.mesh.drain import hand_off
from meshnode.mesh.state import MeshState
from meshnode.net import transport
from meshnode.net.peers import GrpcPeers
from meshnode.observability.metrics import MetricsServer, NodeMetrics, NodeState, serve_metrics
from meshnode.runtimes import create_runtime
from meshnode.serving.cache import ModelCache
from meshnode.serving.dataplane import DataPlane, LocalCopies
from meshnode.settings import NodeSettings
from meshnode.state.aliases import Aliases
from meshnode.state.instances import InstancePublisher
from meshnode.state.registry import ModelRecord, Registry
from meshnode.storage.repository import ModelRepository
from meshpb import pb
from placement.copies import CopyConfig
from placement.policy import choose_load_target
from placement.types import LOADED, NodeView
from router.errors import MeshError
from router.router import Router

log = logging.getLogger("meshserve.node")
READY_LINE = "meshserve node ready"
# After the lease is revoked, peers' watches need a moment before the port closes under them.
LEAVE_PAUSE_S = 0.3


def software_version() -> str:
    try:
        return version("meshserve")
    except PackageNotFoundError:
        return "0+unknown"


class Node:
    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.instance_id = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = NodeMetrics()
        self.runtime = create_runtime(settings)
        self.cache = ModelCache(
            self.runtime, capacity_bytes=settings.capacity, metrics=self.metrics,
            load_timeout_s=settings.load_timeout_s, failure_backoff_s=settings.load_failure_backoff_s,
            load_concurrency=settings.load_concurrency, churn_guard_s=settings.churn_guard_s,
        )
        self.port = 0
        self.metrics_port: int | None = None
        self._store: EtcdStore | None = None
        self._server = transport.create_server()
        self._metrics_server: MetricsServer | None = None
        self._background = BackgroundTasks()
        self.peers = GrpcPeers()
        self._rate = RequestRate()
        self._inflight = Smoothed()
        self._draining = False

    async def start(self) -> None:
        s = self.settings
        await self.runtime.start()
        self._store = await EtcdStore.connect(s.etcd, s.etcd_prefix)
        self.registry = Registry(self._store)
        await self.registry.start()
        self.registry.add_listener(self._on_registry_change)
        self.aliases = Aliases(self._store)
        await self.aliases.start()
        repository = ModelRepository(s.model_repository)
        self.dataplane = DataPlane(registry=self.registry, cache=self.cache, runtime=self.runtime,
                                   metrics=self.metrics, version=software_version())
        self.mesh = MeshState(self._store, self.registry, self.cache, self.runtime, self.instance_id)
        self.control = ModelControl(registry=self.registry, repository=repository, cache=self.cache,
                                    dataplane=self.dataplane, mesh=self.mesh, aliases=self.aliases,
                                    runtime=self.runtime.name)
        self.dataplane.alias_targets = self.aliases.targets
        added = await self.control.register_repository()
        log.info("registered %d new models from %s", added, s.model_repository)
        self.copies = CopyManager(
            cache=self.cache, mesh=self.mesh, registry=self.registry, peers=self.peers, dataplane=self.dataplane,
            config=copy_config(s), interval_s=s.copy_check_interval_s, proactive=s.proactive_loads,
        )
        self.alias_switch = AliasSwitch(aliases=self.aliases, registry=self.registry, mesh=self.mesh,
                                        copies=self.copies)
        self.retirement = Retirement(registry=self.registry, aliases=self.aliases, unregister=self._unregister,
                                     grace_s=s.alias_retire_after_s)
        management = Management(registry=self.registry, control=self.control, mesh=self.mesh, aliases=self.aliases,
                                switch=self.alias_switch)
        transport.add_inference_service(self._server, InferenceServicer(self.dataplane, self.control).handlers())
        transport.add_management_service(self._server, ManagementServicer(management).handlers())
        self._health = transport.Health(self._server)
        self.port = transport.bind(self._server, s.host, s.port)
        await self._server.start()
        # Join the mesh only once this node can answer: peers route to it as soon as it is listed.
        self.publisher = InstancePublisher(self._store, self._node_view)
        await self.publisher.start()
        await self.mesh.start()
        self.mesh.on_node_gone.append(lambda peer: self._background.spawn(self.peers.forget(peer)))
        self.cache.on_change = self.mesh.copy_changed
        self.dataplane.router = Router(LocalCopies(self.dataplane, self.instance_id), self.mesh, self.peers)
        self.dataplane.metadata_elsewhere = self._metadata_elsewhere
        self.copies.start()
        self.retirement.start()
        if s.metrics_port is not None:
            self.metrics.set_state_source(self._state)
            server = await serve_metrics(self.metrics, s.host, s.metrics_port)
            self._metrics_server = server
            self.metrics_port = server.port
        self.dataplane.ready = True
        await self._health.serving()

    def _node_view(self) -> NodeView:
        stats = self.cache.stats()
        return NodeView(
            instance_id=self.instance_id, endpoint=f"{self.settings.advertise_host or self.settings.host}:{self.port}",
            capacity_bytes=stats.capacity_bytes, used_bytes=stats.used_bytes, model_count=stats.models_loaded,
            lru_time_s=stats.lru_time_s, request_rate=self._rate.update(self.metrics.api_requests),
            inflight=self._inflight.update(self.dataplane.inflight), loads_in_progress=stats.loads_in_progress,
            shutting_down=self._draining, version=software_version(), runtime=self.runtime.name,
        )

    async def _metadata_elsewhere(self, name: str, version: str) -> pb.ModelMetadataResponse | None:
        """Metadata from a copy on a live peer; None when there is none to ask."""
        view, live = self.mesh.model(name), self.mesh.nodes()
        # Loaded copies first; a loading one answers once its (single) load is done.
        copies = sorted(view.copies, key=lambda c: c.state != LOADED) if view is not None else []
        for copy in copies:
            node = live.get(copy.instance_id)
            if node is None or node.shutting_down or node.instance_id == self.instance_id:
                continue
            try:
                return await self.peers.metadata(node, name, version)  # type: ignore[no-any-return]
            except MeshError:
                continue
        record = self.registry.get(name)
        if view is not None and record is not None and not record.runs_on(self.runtime.name):
            # No copy, and this node cannot load one: a node that can loads it to answer.
            target = choose_load_target(live.values(), size_bytes=view.size_bytes, now=time.time(),
                                        rng=random.Random(), runtime=view.runtime)
            if target is not None:
                return await self.peers.metadata(live[target], name, version)  # type: ignore[no-any-return]
        return None

    async def _unregister(self, name: str) -> None:
        await self.control.unload(name, {PARAM_UNREGISTER: True})

    def _state(self) -> NodeState:
        if self._store is not None:
            self.metrics.etcd_writes = self._store.writes
        stats = self.cache.stats()
        return NodeState(
            capacity_bytes=stats.capacity_bytes, used_bytes=stats.used_bytes, models_loaded=stats.models_loaded,
            models_managed=len(self.registry.names()), models_with_failure=self.cache.failures.count(),
            lru_time_s=stats.lru_time_s,
        )

    def _on_registry_change(self, name: str, record: ModelRecord | None) -> None:
        # Another node (or the CLI) unregistered or disabled the model: stop serving it here too.
        if (record is None or not record.enabled) and self.cache.has_entry(name, ""):
            self._background.spawn(self.cache.unload_model(name))

    async def stop(self, grace_s: float = 10.0) -> None:
        """Drain (meshnode.mesh.drain), then leave: no request fails on the way out."""
        self.dataplane.ready = False
        if hasattr(self, "_health"):
            await self._health.draining()  # balancers stop sending here
        self._draining = True
        if hasattr(self, "publisher"):
            await self.copies.stop()
            await self.retirement.stop()
            await self.publisher.publish_now()  # placement elsewhere stops choosing this node
            moved, failed = await hand_off(self.cache, self.mesh, self.peers)
            log.info("drained: %d models handed off, %d could not be", moved, failed)
            await self.publisher.stop()  # revokes the lease: peers stop routing here at once
            await self.mesh.stop()
            await asyncio.sleep(LEAVE_PAUSE_S)
        await self._server.stop(grace_s)
        await self.peers.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()
        await self.cache.close()
        await self.runtime.close()
        if hasattr(self, "registry"):
            await self.registry.stop()
            await self.aliases.stop()
        if self._store is not None:
            await self._store.close()


def copy_config(settings: NodeSettings) -> CopyConfig:
    # Scale-down stays well below the add threshold, whatever it is set to: no add/remove flapping.
    cool = min(CopyConfig().cool_rate_per_copy, settings.hot_rate_per_copy / 4)
    return CopyConfig(hot_rate_per_copy=settings.hot_rate_per_copy,
                      hot_inflight_per_copy=settings.hot_inflight_per_copy,
                      max_copies=settings.max_copies, cool_rate_per_copy=cool)


class RequestRate:
    """Requests per second, smoothed over about ten seconds, from a growing counter."""

    def __init__(self) -> None:
        self._count = 0
        self._at = time.monotonic()
        self.rate = 0.0

    def update(self, count: int) -> float:
        now = time.monotonic()
        elapsed = now - self._at
        if elapsed >= 0.2:
            alpha = min(1.0, elapsed / 10.0)
            self.rate += alpha * ((count - self._count) / elapsed - self.rate)
            self._count, self._at = count, now
        return round(self.rate, 1)


class Smoothed:
    """An in-flight count averaged over a few seconds: at full load it swings 0..N between samples,
    and publishing every swing would spend the instance record's write budget on noise."""

    def __init__(self, alpha: float = 0.1) -> None:
        self._alpha = alpha
        self._value = 0.0

    def update(self, sample: int) -> int:
        self._value += self._alpha * (sample - self._value)
        return round(self._value)


async def run_node(settings: NodeSettings) -> None:
    node = Node(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await node.start()
    metrics = f" metrics={settings.host}:{node.metrics_port}" if node.metrics_port is not None else ""
    # Launchers (tests, `meshserve local`) read the bound ports from this line.
    print(f"{READY_LINE} grpc={settings.host}:{node.port}{metrics} instance={node.instance_id}", flush=True)
    await stopping.wait()
    log.info("stopping")
    await node.stop()


def main_node(settings: NodeSettings) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run_node(settings))
    return 0
