"""The composition root: builds every part of a node in order, starts them, and drains and stops them.

Each part gets its collaborators in its constructor; nothing is wired onto a part afterwards. Parts
that follow state subscribe to it themselves (listeners), so the order below is the whole wiring.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import grpc

from meshnode.api.access import Access, read_credentials
from meshnode.api.config import ModelConfigs
from meshnode.api.http.server import RestServer
from meshnode.api.inference import InferenceServicer
from meshnode.api.management import ManagementServicer
from meshnode.api.protocol_extras import ProtocolExtrasServicer
from meshnode.api.threaded import after_hits
from meshnode.api.threaded_lane import ThreadedLane
from meshnode.background import BackgroundTasks
from meshnode.control.alias_retirement import Retirement
from meshnode.control.alias_switch import AliasSwitch
from meshnode.control.management import Management
from meshnode.control.model_control import ModelControl
from meshnode.control.repository_registration import RepositoryRegistration
from meshnode.control.repository_sync import RepositorySync
from meshnode.control.stale_copies import StaleCopies
from meshnode.etcd.store import EtcdStore
from meshnode.mesh.copy_manager import CopyManager
from meshnode.mesh.drain import hand_off
from meshnode.mesh.metadata import PeerMetadata
from meshnode.mesh.runtime_health import RuntimeHealth
from meshnode.mesh.state import MeshState
from meshnode.mesh.statistics import MeshStatistics
from meshnode.mesh.totals import mesh_totals
from meshnode.net import transport
from meshnode.net.health import Health
from meshnode.net.peer_load import PeerLoad
from meshnode.net.peers import GrpcPeers
from meshnode.net.proof import MeshProof, read_secret
from meshnode.net.threaded_peers import ThreadedPeers
from meshnode.net.tls import ClientTls, ServerTls
from meshnode.observability.endpoint import MetricsServer, serve_metrics
from meshnode.observability.metrics import NodeMetrics, NodeState
from meshnode.observability.rates import RequestRate, Smoothed
from meshnode.observability.tracing import Tracing, tracer_provider
from meshnode.runtimes import create_runtime
from meshnode.serving.cache import ModelCache
from meshnode.serving.dataplane import DataPlane
from meshnode.serving.replica import LocalReplica
from meshnode.serving.runtime_status import RuntimeStatus
from meshnode.serving.statistics import ModelStatistics
from meshnode.serving.threaded_forwards import ThreadedForwards
from meshnode.serving.threaded_hits import ThreadedHits
from meshnode.settings import NodeSettings
from meshnode.state.aliases import Aliases
from meshnode.state.instances import InstancePublisher
from meshnode.state.registry import ModelRecord, Registry
from meshnode.storage.materializer import StorageStats
from meshnode.storage.node_storage import open_storage
from meshnode.storage.uris import StoreOptions
from placement.copies import CopyConfig
from placement.types import NodeView
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
    def __init__(self, settings: NodeSettings, store: EtcdStore) -> None:
        s = self.settings = settings
        self.instance_id = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self._store = store
        self._background = BackgroundTasks()
        self.metrics = NodeMetrics(s.per_model_metrics)
        # Tracing: on with --otlp-endpoint or the OTEL_* variables; off, no part holds a Tracing.
        self._tracer_provider = tracer_provider(s.otlp_endpoint, os.environ, self.instance_id)
        tracing = (Tracing(self._tracer_provider.get_tracer("meshnode"), s.advertise_host or s.host)
                   if self._tracer_provider is not None else None)
        self.runtime = create_runtime(settings)
        self.storage = open_storage(
            repository=s.model_repository, model_store=s.model_store, allowed=s.allowed_storage_prefixes(),
            disk_cache=s.disk_cache, disk_cache_size=s.disk_cache_size,
            options=StoreOptions(s3_endpoint_url=s.s3_endpoint_url, s3_region=s.s3_region,
                                 s3_anonymous=s.s3_anonymous))
        self.cache = ModelCache(
            self.runtime, capacity_bytes=s.capacity, metrics=self.metrics, load_timeout_s=s.load_timeout_s,
            failure_backoff_s=s.load_failure_backoff_s, load_concurrency=s.load_concurrency,
            churn_guard_s=s.churn_guard_s, runs_per_copy=s.runs_per_copy, max_queued=s.max_queued_per_model,
            tracing=tracing,
        )
        # state
        self.registry = Registry(store)
        self.registry.add_listener(self._on_registry_change)
        self.aliases = Aliases(store)
        # serving and the mesh; peers prove membership by mutual TLS on the peer port, or else by a MeshProof
        proof = MeshProof(read_secret(s.mesh_secret_file)) if s.mesh_secret_file is not None else None
        self._peer_tls = (ServerTls(s.peer_cert, s.peer_key, client_ca=s.peer_ca)
                          if s.peer_cert is not None and s.peer_key is not None and s.peer_ca is not None else None)
        peer_tls = ClientTls(s.peer_ca, s.peer_cert, s.peer_key) if self._peer_tls else None
        peer_proof = None if self._peer_tls else proof
        # Calls out to peers, counted for both servers' forwards (the threaded server's in api.threaded_lane)
        load = PeerLoad()
        self.peers = GrpcPeers(load, tls=peer_tls, proof=peer_proof,
                               client_span=tracing.client if tracing is not None else None)
        self.mesh = MeshState(store, self.registry, self.cache, self.runtime, self.instance_id,
                              on_node_gone=self._peer_gone)
        self.runtime_status = RuntimeStatus()
        self.statistics = ModelStatistics()
        self.replica = LocalReplica(instance_id=self.instance_id, registry=self.registry, cache=self.cache,
                                    runtime=self.runtime, metrics=self.metrics, status=self.runtime_status,
                                    tracing=tracing, statistics=self.statistics, files=self.storage.files)
        self.dataplane = DataPlane(
            replica=self.replica, router=Router(self.replica, self.mesh, self.peers, tracer=tracing), cache=self.cache,
            registry=self.registry, alias_targets=self.aliases.targets,
            metadata_elsewhere=PeerMetadata(mesh=self.mesh, registry=self.registry, peers=self.peers,
                                            runtime=self.runtime.name),
            metrics=self.metrics, version=software_version(), max_inflight=s.max_inflight, tracing=tracing,
            peers=self.peers,
        )
        self.copies = CopyManager(
            cache=self.cache, mesh=self.mesh, registry=self.registry, peers=self.peers, replica=self.replica,
            config=copy_config(s), interval_s=s.copy_check_interval_s, proactive=s.proactive_loads,
        )
        # control
        self.control = ModelControl(registry=self.registry, repository=self.storage.local_repository,
                                    locations=self.storage.locations, cache=self.cache, replica=self.replica,
                                    mesh=self.mesh, aliases=self.aliases, copies=self.copies,
                                    runtime=self.runtime.name)
        self.repository_registration = RepositoryRegistration(
            repository=self.storage.local_repository, registry=self.registry, runtime=self.runtime.name,
            background=self._background)
        # A store's repository is followed by one node for the mesh (the lowest live instance id).
        self.repository_sync = RepositorySync(
            repository_uri=s.model_repository, list_models=functools.partial(self.storage.store.list_models,
                                                                             s.model_repository),
            registry=self.registry, unregister=functools.partial(self.control.unload, unregister=True),
            polls_here=lambda: min(self.mesh.nodes(), default=self.instance_id) >= self.instance_id,
            runtime=self.runtime.name, interval_s=s.repository_poll_interval,
        ) if self.storage.local_repository is None else None
        self.stale_copies = StaleCopies(registry=self.registry, cache=self.cache, background=self._background)
        self.retirement = Retirement(registry=self.registry, aliases=self.aliases,
                                     unregister=functools.partial(self.control.unload, unregister=True),
                                     grace_s=s.alias_retire_after_s)
        management = Management(registry=self.registry, control=self.control, mesh=self.mesh, aliases=self.aliases,
                                switch=AliasSwitch(aliases=self.aliases, registry=self.registry, mesh=self.mesh,
                                                   copies=self.copies))
        # api: the client port, and the peer port under mutual TLS (where every caller is a mesh member)
        self.unauthenticated = proof is None and self._peer_tls is None
        access = Access(members=self.unauthenticated, proof=proof, require_for_infer=s.require_auth_for_infer,
                        credentials=read_credentials(s.auth_tokens) if s.auth_tokens is not None else None)
        extras = ProtocolExtrasServicer(
            configs=ModelConfigs(registry=self.registry, cache=self.cache, replica=self.replica, mesh=self.mesh,
                                 peers=self.peers, alias_targets=self.aliases.targets),
            statistics=MeshStatistics(local=self.statistics, mesh=self.mesh, peers=self.peers, registry=self.registry,
                                      alias_targets=self.aliases.targets),
            tracing=tracing is not None, log_format=s.log_format)
        inference = {**InferenceServicer(self.dataplane, self.control, self.metrics).handlers(), **extras.handlers()}
        # The gRPC ports: grpc.aio's servers, or grpcio's threaded ones (--grpc-server threaded), whose polling
        # threads answer local hits and forward to peers' copies themselves (api.threaded_lane).
        self._lane = self._threaded_lane(ThreadedPeers(load, peer_tls, peer_proof), load, tracing) \
            if s.grpc_server == "threaded" else None
        self._server = self._grpc_server()
        transport.add_inference_service(self._server, self._handlers(self._server, access, inference))
        # KServe v2 REST: the same handlers, guarded on the loop, called with the request converted (api.http)
        rest = access.guard(inference) if self._lane is None else after_hits(access.guard(inference), self._lane.hits)
        self._rest = RestServer(rest, s.http_max_request_size) if s.http_port is not None else None
        management_handlers = ManagementServicer(management).handlers()
        transport.add_management_service(self._server, self._handlers(self._server, access, management_handlers))
        self._health = Health(self._server)
        transport.add_reflection(self._server)
        self._peer_server = None
        if self._peer_tls is not None:
            self._peer_server = self._grpc_server()
            transport.add_inference_service(self._peer_server,
                                            self._handlers(self._peer_server, Access(members=True), inference))
        self.publisher = InstancePublisher(store, self._node_view)
        self.runtime_health = RuntimeHealth(runtime=self.runtime, cache=self.cache, status=self.runtime_status,
                                            publisher=self.publisher, health=self._health)
        self._rate = RequestRate()
        self._inflight = Smoothed()
        self._draining = False
        self.port = 0
        self.peer_port: int | None = None
        self._metrics_server: MetricsServer | None = None

    def _peer_gone(self, instance_id: str) -> None:
        self.peers.forget(instance_id)
        if self._lane is not None:
            self._lane.forget(instance_id)

    def _threaded_lane(self, peers: ThreadedPeers, load: PeerLoad, tracing: Tracing | None) -> ThreadedLane:
        loop = asyncio.get_running_loop()
        hits = ThreadedHits(
            cache=self.cache, dataplane=self.dataplane, alias_targets=self.aliases.targets, records=self.registry.view,
            metrics=self.metrics, statistics=self.statistics, instance_id=self.instance_id, loop=loop, tracing=tracing)
        forwards = ThreadedForwards(
            mesh=self.mesh, peers=peers, load=load, dataplane=self.dataplane, cache=self.cache,
            alias_targets=self.aliases.targets, hits=hits, instance_id=self.instance_id, tracing=tracing)
        return ThreadedLane(hits=hits, forwards=forwards, peers=peers, threads=self.settings.server_threads, loop=loop)

    def _grpc_server(self) -> transport.Server:
        return transport.create_server() if self._lane is None else self._lane.server()

    def _handlers(self, server: transport.Server, access: Access,
                  handlers: Mapping[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
        """The coroutine handlers as the node's gRPC servers take them: guarded on grpc.aio's (api.access), the
        threaded lane's way on a threaded one."""
        if self._lane is None:
            return access.guard(handlers)
        assert isinstance(server, grpc.Server)
        return self._lane.handlers(server, access, handlers)

    @property
    def http_port(self) -> int | None:
        return self._rest.port if self._rest is not None else None

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server is not None else None

    async def start(self) -> None:
        s = self.settings
        await self.runtime.start()
        await self.registry.start()
        await self.aliases.start()
        # Registered in the background: the node serves them meanwhile (meshnode.control.repository_registration).
        self.repository_registration.start()
        await self.repository_registration.head_start()
        client_tls = ServerTls(s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert and s.tls_key else None
        self.port = transport.bind(self._server, s.host, s.port, client_tls)
        await transport.start(self._server)
        if self._peer_server is not None:
            self.peer_port = transport.bind(self._peer_server, s.host, s.peer_port, self._peer_tls)
            await transport.start(self._peer_server)
        if self._lane is not None:
            self._lane.start()
        if self._rest is not None and s.http_port is not None:
            await self._rest.start(s.host, s.http_port, client_tls)
        warn_if_open(s, self.unauthenticated)
        # Join the mesh only once this node can answer: peers route to it as soon as it is listed.
        await self.publisher.start()
        await self.mesh.start()
        self.copies.start()
        self.retirement.start()
        if self.repository_sync is not None:
            self.repository_sync.start()
        self.runtime_health.start()
        if s.metrics_port is not None:
            self._metrics_server = await serve_metrics(self.metrics, s.host, s.metrics_port, self._state)
        self.dataplane.set_ready(True)
        await self._health.serving()

    def _node_view(self) -> NodeView:
        stats = self.cache.stats()
        return NodeView(
            instance_id=self.instance_id,
            # Where peers reach this node: the peer port when there is one.
            endpoint=f"{self.settings.advertise_host or self.settings.host}:{self.peer_port or self.port}",
            capacity_bytes=stats.capacity_bytes, used_bytes=stats.used_bytes, model_count=stats.models_loaded,
            lru_time_s=stats.lru_time_s, request_rate=self._rate.update(self.metrics.api_requests),
            inflight=self._inflight.update(self.dataplane.inflight), loads_in_progress=stats.loads_in_progress,
            shutting_down=self._draining, version=software_version(), runtime=self.runtime.name,
            runtime_down=not self.runtime_status.up,
        )

    def _state(self) -> NodeState:
        """For a metrics scrape, which then renders the metrics: both count every local hit so far."""
        if self._lane is not None:
            self._lane.hits.drain()
        stats = self.cache.stats()
        live = self.mesh.nodes()
        # The mesh's totals come from one node, as from ModelMesh's leader: the lowest live instance id.
        reports = min(live, default=self.instance_id) >= self.instance_id
        return with_storage(NodeState(
            capacity_bytes=stats.capacity_bytes, used_bytes=stats.used_bytes, models_loaded=stats.models_loaded,
            lru_time_s=stats.lru_time_s, etcd_writes=self._store.writes, requests_queued=self.cache.queues.queued,
            mesh=mesh_totals(self.registry.records_in_use(), len(self.registry.view), live, time.time(),
                             self.settings.load_failure_backoff_s)
            if reports else None,
        ), self.storage.files.stats())

    def _on_registry_change(self, name: str, record: ModelRecord | None) -> None:
        # Another node (or the CLI) unregistered or disabled the model: stop serving it here too.
        if record is None:
            self.statistics.forget(name)
        if (record is None or not record.enabled) and self.cache.has_entry(name, ""):
            self._background.spawn(self.cache.unload_model(name))

    async def stop(self, grace_s: float = 10.0) -> None:
        """Drain (meshnode.mesh.drain), then leave: no request fails on the way out."""
        self.dataplane.set_ready(False)
        await self._health.draining()  # balancers stop sending here
        self._draining = True
        if self.publisher.started:
            await self.copies.stop()
            await self.retirement.stop()
            if self.repository_sync is not None:
                await self.repository_sync.stop()
            await self.runtime_health.stop()
            await self.publisher.publish_now()  # placement elsewhere stops choosing this node
            moved, failed = await hand_off(self.cache, self.mesh, self.peers)
            log.info("drained: %d models handed off, %d could not be", moved, failed)
            await self.publisher.stop()  # revokes the lease: peers stop routing here at once
            await self.mesh.stop()
            await asyncio.sleep(LEAVE_PAUSE_S)
        await asyncio.gather(*(transport.stop(server, grace_s) for server in (self._server, self._peer_server)
                               if server is not None))
        if self._lane is not None:  # after its servers, which ended their calls
            await self._lane.stop()
        if self._rest is not None:
            await self._rest.close()
        await self.peers.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()
        await self.cache.close()
        await self.runtime.close()
        self.storage.close()
        await self.registry.stop()
        await self.aliases.stop()
        await self._background.cancel()
        await self._store.close()
        if self._tracer_provider is not None:
            await asyncio.to_thread(self._tracer_provider.shutdown)  # exports the spans still batched


def copy_config(settings: NodeSettings) -> CopyConfig:
    # Scale-down stays well below the add threshold, whatever it is set to: no add/remove flapping.
    cool = min(CopyConfig().cool_rate_per_copy, settings.hot_rate_per_copy / 4)
    return CopyConfig(hot_rate_per_copy=settings.hot_rate_per_copy,
                      hot_inflight_per_copy=settings.hot_inflight_per_copy,
                      max_copies=settings.max_copies, cool_rate_per_copy=cool)


def warn_if_open(s: NodeSettings, unauthenticated: bool) -> None:
    """One line at start-up when anyone who reaches the node may steer it (plaintext stays the default)."""
    management = "" if s.auth_tokens else "management is open to anyone who reaches its port (set --auth-tokens)"
    if unauthenticated:
        log.warning("this node is unauthenticated: it honours hops from any caller (set --peer-cert/--peer-key/"
                    "--peer-ca or --mesh-secret-file)%s", f"; {management}" if management else "")
    elif management:
        log.warning("%s", management)


def with_storage(state: NodeState, stats: StorageStats | None) -> NodeState:
    """The state with the disk tier's figures; as it is for a node without stores."""
    if stats is None:
        return state
    return dataclasses.replace(state, storage_pulled_bytes=stats.bytes_pulled, storage_pull_seconds=stats.pull_seconds,
                               disk_cache_hits=stats.hits, disk_cache_misses=stats.misses,
                               disk_cache_bytes=stats.disk_bytes, disk_cache_models=stats.disk_models)
