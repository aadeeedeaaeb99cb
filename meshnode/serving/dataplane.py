"""The node's transport-neutral entry point: inference, readiness, metadata.

Servicers only convert and call in here. The hit path of `infer` is a dict lookup, the model's
own infer on the local replica, and a few counter updates; a miss goes to the router, which serves
it on the local replica, at a peer's copy, or wherever placement loads it. Hop metadata is only
read on a miss.

Overload: the hit path compares two integers against their bounds, the node's requests in flight
(`max_inflight`: refused at once) and the copy's (`runs_per_copy` running plus `max_queued` waiting,
in serving.waiting). A copy at its bound sends a client's request to the router, which tries the model's
other copies, and refuses a peer's, so that the peer tries another (router.router).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextvars import ContextVar
from typing import Protocol

import grpc

from meshnode.errors import InvalidInput, ModelLost, Unsupported
from meshnode.net import transport
from meshnode.observability.metrics import NodeMetrics
from meshnode.observability.tracing import Tracing, status_code
from meshnode.runtimes.base import CallerMetadata, TensorSpec
from meshnode.serving.cache import ModelCache
from meshnode.serving.entries import CachedModel
from meshnode.serving.replica import LocalReplica
from meshnode.serving.streams import ErrorResponse, StreamPeers, StreamSession
from meshnode.state.registry import Registry
from meshpb import pb
from placement.types import LOADED
from router.errors import MeshError, Overloaded
from router.hop import PARAMETER_KEY, Hop
from router.router import Router
from router.sequences import SequenceFlags, sequence_of

TimeRemaining = Callable[[], float | None]

INFER = "ModelInfer"  # the method in metrics' labels and span names
STREAM_INFER = "ModelStreamInfer"
SERVER_NAME = "meshserve"
SERVER_EXTENSIONS = ("model_repository", "model_repository(unload_dependents)", "parameters")
# Peers that failed the request already on a path outside the router (the threaded server's forward from its
# polling thread, serving.threaded_forwards), in the context its loop task copies: the router skips them.
TRIED_ALREADY: ContextVar[tuple[str, ...]] = ContextVar("meshserve_tried_already", default=())
# What Triton's std::stol takes as a version: leading blanks, a sign, digits (anything after them it ignores).
_VERSION_PREFIX = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")


def check_version(version: str) -> None:
    """Triton's refusal, in its words, of a version string that is no version ("" is the newest)."""
    if not version:
        return
    found = _VERSION_PREFIX.match(version)
    value = int(found.group()) if found is not None else None
    if value is None or not -(2**63) <= value < 2**63:  # past int64: stol's out_of_range, worded the same
        raise InvalidInput(f"failed to get model version from specified version string '{version}' (details: "
                           "stol), version should be an integral value > 0")
    if value < 0:
        raise InvalidInput(f"invalid model version specified '{version}' , version should be an integral value > 0")


def _told(error: BaseException | None, time_remaining: TimeRemaining | None) -> grpc.StatusCode:
    """The status the request's client got: DEADLINE_EXCEEDED for a call its deadline ended, not the cancellation
    that reached its handler then."""
    code = status_code(error)
    if code is grpc.StatusCode.CANCELLED and time_remaining is not None:
        left = time_remaining()
        if left is not None and left <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
    return code


class MetadataElsewhere(Protocol):
    async def __call__(self, name: str, version: str) -> pb.ModelMetadataResponse | None:
        """Metadata from a copy on another node; None when the mesh has none to ask."""
        ...


class DataPlane:
    def __init__(
        self, *, replica: LocalReplica, router: Router, cache: ModelCache, registry: Registry,
        alias_targets: Mapping[str, str], metadata_elsewhere: MetadataElsewhere, metrics: NodeMetrics, version: str,
        max_inflight: int = 512, tracing: Tracing | None = None, peers: StreamPeers | None = None,
    ) -> None:
        self._replica = replica
        self._router = router
        self._cache = cache
        self._registry = registry
        # alias -> model (meshnode.state.aliases keeps it current); read only when a name is not cached here.
        self._alias_targets = alias_targets
        self._metadata_elsewhere = metadata_elsewhere
        self._metrics = metrics
        self._version = version
        self._ready = False
        # Requests in flight here, the threaded server's local hits (serving.threaded_hits) among them: changed
        # under the cache's lock, which those change it under from their worker threads.
        self.inflight = 0
        self.max_inflight = max_inflight
        self._inflight_lock = cache.inflight_lock
        # A copy's bounds, from the cache that keeps its waiting requests: read here once, compared per request.
        self._queues = cache.queues
        self._runs_per_copy = cache.queues.runs_per_copy
        self._max_per_copy = cache.queues.runs_per_copy + cache.queues.max_queued
        self._tracing = tracing  # None: tracing is off
        self._peers = peers  # None: no streams (unit tests of the unary path)

    @property
    def ready(self) -> bool:
        """ServerReady: from the end of the node's start to the start of its drain."""
        return self._ready

    def set_ready(self, ready: bool) -> None:
        self._ready = ready

    async def infer(
        self, request: pb.ModelInferRequest, metadata: CallerMetadata | None = None,
        time_remaining: TimeRemaining | None = None,
    ) -> pb.ModelInferResponse:
        """A client's or a peer's request: a local hit, else routed through the mesh."""
        started = time.perf_counter()
        response = error = None
        try:
            if self._tracing is None:
                response = await self._infer(request, started, metadata, time_remaining)
                return response
            with self._tracing.server(INFER, metadata() if metadata is not None else None) as span:
                if span.is_recording():
                    sent = request.parameters.get(PARAMETER_KEY)
                    self._tracing.describe(span, INFER, request.model_name, request.model_version,
                                           Hop.decode(sent.string_param) if sent is not None else Hop())
                response = await self._infer(request, started, metadata, time_remaining)
                return response
        except BaseException as failed:
            error = failed
            if isinstance(failed, MeshError) and failed.node is None:
                failed.node = self._replica.instance_id
            raise
        finally:
            response_size = self._metrics.observe_api(INFER, _told(error, time_remaining).name,
                                                      (time.perf_counter() - started) * 1000.0, request.model_name,
                                                      transport.REQUEST_BYTES.get())
            if response is not None:
                transport.RESPONSE_BYTES_TO.set(response_size)

    async def _infer(
        self, request: pb.ModelInferRequest, started: float, metadata: CallerMetadata | None,
        time_remaining: TimeRemaining | None,
    ) -> pb.ModelInferResponse:
        metrics = self._metrics
        metrics.api_requests += 1
        if self.inflight >= self.max_inflight:
            metrics.requests_rejected += 1
            raise Overloaded(f"model '{request.model_name}' was not served: node {self._replica.instance_id} has "
                             f"{self.inflight} requests in flight, its limit (--max-inflight {self.max_inflight})")
        with self._inflight_lock:
            self.inflight += 1
        entry, sequence = self._here(request)
        try:
            overloaded = None
            if entry is not None:
                inflight = entry.inflight
                if inflight < self._runs_per_copy:
                    metrics.ran_without_waiting += 1
                elif inflight >= self._max_per_copy:
                    overloaded = self._copy_overloaded(entry.name, inflight)
                elif (late := self.past_deadline(entry, inflight, time_remaining)) is not None:
                    overloaded = late
                else:
                    self._queues.wait_for_slot(entry, started)
                if overloaded is None:
                    self._cache.take(entry)
                    metrics.cache_hits += 1
                    try:
                        return await self._replica.run(entry, request, started,
                                                       time_remaining() if time_remaining else None, metadata)
                    except ModelLost:
                        pass  # run() forgot the copy: the router below loads it again, here or elsewhere
            check_version(request.model_version)
            hop = self._hop_of(request, metadata)
            # The router knows no protocol (router.ports): it answers what this node or a peer answered.
            response: pb.ModelInferResponse = await self._router.route(
                request, hop, time_remaining() if time_remaining is not None else None, overloaded,
                sequence=sequence)
            return response
        except Overloaded:
            metrics.requests_rejected += 1  # this node's answer is RESOURCE_EXHAUSTED, to a client or a peer
            raise
        finally:
            with self._inflight_lock:
                self.inflight -= 1

    def _here(self, request: pb.ModelInferRequest) -> tuple[CachedModel | None, SequenceFlags | None]:
        """The loaded copy here that serves the request, if any, and its sequence. An alias is served as the model
        it points at now (the request, and so the response, names that model); a client's request of a sequence
        goes to the sequence's copy (router.sequences), wherever that is."""
        entry = self._cache.ready.get((request.model_name, request.model_version))
        if entry is None and (target := self._alias_targets.get(request.model_name)) is not None:
            request.model_name = target
            entry = self._cache.ready.get((target, request.model_version))
        sequence = sequence_of(request.parameters) if request.parameters else None
        if sequence is not None and PARAMETER_KEY not in request.parameters:
            entry = None
        return entry, sequence

    def _hop_of(self, request: pb.ModelInferRequest, metadata: CallerMetadata | None) -> Hop:
        hop = Hop.from_metadata(metadata() if metadata is not None else None)
        sent = request.parameters.get(PARAMETER_KEY)
        if sent is not None:  # from a peer: the hop rides in the request (router.hop)
            hop = Hop.decode(sent.string_param, hop.propagated)
        if tried := TRIED_ALREADY.get():
            hop = dataclasses.replace(hop, tried=(*hop.tried, *tried))
        if self._tracing is not None:
            self._tracing.routed(hop)
        return hop

    def stream(self, requests: AsyncIterator[pb.ModelInferRequest], error: ErrorResponse,
               metadata: CallerMetadata | None = None, time_remaining: TimeRemaining | None = None,
               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """A client's or a peer's ModelStreamInfer: each request routed as `infer` routes it, its responses (many
        from a decoupled model) as produced (serving.streams)."""
        if self._peers is None:
            raise Unsupported("this node does not stream")
        session = StreamSession(replica=self._replica, cache=self._cache, peers=self._peers, error=error,
                                observe=self._observe_stream_request, metadata=metadata,
                                time_remaining=time_remaining)

        async def route(request: pb.ModelInferRequest, serve: StreamSession) -> None:
            check_version(request.model_version)
            entry, sequence = self._here(request)
            if entry is not None:
                await serve.here(request, False)
                return
            await self._router.route(request, self._hop_of(request, metadata),
                                     time_remaining() if time_remaining is not None else None, serve=serve,
                                     sequence=sequence)

        return session.responses(requests, route)

    def _observe_stream_request(self, request: pb.ModelInferRequest, arrived: float,
                                error: BaseException | None) -> None:
        """A stream's request counts as an external request, as a unary one does; its responses' sizes are not
        recorded (a decoupled model's are many). Its size is the one its reader recorded (net.transport), in the
        context this runs in: the stream's, or the run's task made from it."""
        self._metrics.api_requests += 1
        self._metrics.observe_api(STREAM_INFER, status_code(error).name, (time.perf_counter() - arrived) * 1000.0,
                                  request.model_name, transport.REQUEST_BYTES.get())

    def past_deadline(self, entry: CachedModel, inflight: int,
                       time_remaining: TimeRemaining | None) -> Overloaded | None:
        """Refused now, rather than queued to miss its deadline: the runs ahead of it on this copy (at the copy's
        smoothed run time) and its own would take longer than the client's time left. Another copy may serve it."""
        remaining = time_remaining() if time_remaining is not None else None
        if remaining is None or not entry.run_s:
            return None
        expected_s = (inflight - self._runs_per_copy + 1) * entry.run_s / self._runs_per_copy + entry.run_s
        if expected_s <= remaining:
            return None
        return Overloaded(f"model '{entry.name}' would answer in about {expected_s * 1000:.0f} ms on node "
                          f"{self._replica.instance_id} ({inflight - self._runs_per_copy} waiting before it), after "
                          f"the request's deadline ({remaining * 1000:.0f} ms left)")

    def _copy_overloaded(self, name: str, inflight: int) -> Overloaded:
        return Overloaded(f"model '{name}' has {inflight - self._runs_per_copy} requests waiting on node "
                          f"{self._replica.instance_id}, its limit (--max-queued-per-model "
                          f"{self._max_per_copy - self._runs_per_copy})")

    def model_ready(self, name: str, version: str) -> bool:
        """True when a request for the model would be served now: a copy in the mesh, or loadable."""
        name = self._alias_targets.get(name, name)
        if (name, version) in self._cache.ready:
            return True
        record = self._registry.get(name)
        if record is None or not record.enabled:
            return False
        if any(c["state"] == LOADED and (not version or version in c.get("versions", ()))
               for c in record.copies.values()):
            return True
        try:
            versions = self._replica.served_versions(record)
        except MeshError:  # a broken config.pbtxt: not ready, and a load would say why
            return False
        if versions is None:  # a store's model this node never pulled: loadable as far as it knows
            return not self._cache.failures.active(name, version) if version else True
        wanted = version or (versions[-1] if versions else "")
        return wanted in versions and not self._cache.failures.active(name, wanted)

    async def model_metadata(self, name: str, version: str, forwarded: bool = False) -> pb.ModelMetadataResponse:
        """From a copy here, else from a copy elsewhere; a load here only when the mesh has none.

        Clients ask for metadata before their first request: loading a copy on every node they
        touch would defeat placement. For an alias, the answer names the alias: what to send requests to.
        """
        check_version(version)
        model = self._alias_targets.get(name)
        if model is not None:
            found = await self.model_metadata(model, version, forwarded)
            found.name = name
            return found
        if not forwarded and not self._cache.has_entry(name, version):
            found_elsewhere = await self._metadata_elsewhere(name, version)
            if found_elsewhere is not None:
                return found_elsewhere
        entry = await self._replica.acquire(name, version)
        try:
            loaded = entry.model
            assert loaded is not None
            record = self._registry.get(name)
            versions = (self._replica.served_versions(record) if record else None) or [loaded.version]
            return pb.ModelMetadataResponse(
                name=name,
                versions=versions,
                platform=loaded.platform,
                inputs=[_tensor_metadata(t) for t in loaded.inputs],
                outputs=[_tensor_metadata(t) for t in loaded.outputs],
            )
        finally:
            self._cache.release(entry)

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=SERVER_EXTENSIONS)


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)
