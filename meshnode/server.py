"""Composition root: builds the node's parts, wires them, starts and stops them."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from importlib.metadata import PackageNotFoundError, version

from meshnode import transport
from meshnode.cache import ModelCache
from meshnode.dataplane import DataPlane
from meshnode.etcdstore import EtcdStore
from meshnode.metrics import MetricsServer, NodeMetrics, NodeState, serve_metrics
from meshnode.model_control import ModelControl
from meshnode.registry import ModelRecord, Registry
from meshnode.repository import ModelRepository
from meshnode.runtimes.onnx import OnnxRuntime
from meshnode.servicers import InferenceServicer
from meshnode.settings import NodeSettings

log = logging.getLogger("meshserve.node")
READY_LINE = "meshserve node ready"


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
        self.runtime = OnnxRuntime(
            intra_op_threads=settings.intra_op_threads, load_workers=settings.load_workers,
            infer_workers=settings.infer_workers, inline_threshold_ms=settings.inline_threshold_ms,
        )
        self.cache = ModelCache(
            self.runtime, capacity_bytes=settings.capacity, metrics=self.metrics,
            load_timeout_s=settings.load_timeout_s, failure_backoff_s=settings.load_failure_backoff_s,
        )
        self.port = 0
        self.metrics_port: int | None = None
        self._store: EtcdStore | None = None
        self._server = transport.create_server()
        self._metrics_server: MetricsServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        s = self.settings
        self._store = await EtcdStore.connect(s.etcd, s.etcd_prefix)
        self.registry = Registry(self._store)
        await self.registry.start()
        self.registry.add_listener(self._on_registry_change)
        repository = ModelRepository(s.model_repository)
        self.dataplane = DataPlane(registry=self.registry, cache=self.cache, runtime=self.runtime,
                                   metrics=self.metrics, version=software_version())
        self.control = ModelControl(registry=self.registry, repository=repository, cache=self.cache,
                                    dataplane=self.dataplane, instance_id=self.instance_id)
        added = await self.control.register_repository()
        log.info("registered %d new models from %s", added, s.model_repository)
        transport.add_inference_service(self._server, InferenceServicer(self.dataplane, self.control).handlers())
        self.port = transport.bind(self._server, s.host, s.port)
        await self._server.start()
        if s.metrics_port is not None:
            self.metrics.set_state_source(self._state)
            server = await serve_metrics(self.metrics, s.host, s.metrics_port)
            self._metrics_server = server
            self.metrics_port = server.port
        self.dataplane.ready = True

    def _state(self) -> NodeState:
        stats = self.cache.stats()
        return NodeState(
            capacity_bytes=stats.capacity_bytes, used_bytes=stats.used_bytes, models_loaded=stats.models_loaded,
            models_managed=len(self.registry.names()), models_with_failure=self.cache.failures(),
            lru_time_s=stats.lru_time_s,
        )

    def _on_registry_change(self, name: str, record: ModelRecord | None) -> None:
        # Another node (or the CLI) unregistered or disabled the model: stop serving it here too.
        if (record is None or not record.enabled) and any(True for _ in self.cache.entries(name)):
            task = asyncio.ensure_future(self.cache.unload_model(name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self, grace_s: float = 5.0) -> None:
        self.dataplane.ready = False
        await self._server.stop(grace_s)
        if self._metrics_server is not None:
            await self._metrics_server.close()
        await self.cache.close()
        await self.runtime.close()
        if hasattr(self, "registry"):
            await self.registry.stop()
        if self._store is not None:
            await self._store.close()


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
