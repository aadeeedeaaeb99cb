"""Thin gRPC handlers of Triton's inference protocol: convert, call the dataplane or model control.

A hop (router.hop) from a caller that did not prove it is a mesh member (api.access) is stripped here,
before the dataplane sees it: the request then routes as a fresh client request, so a client cannot pick
a load mode. Each stripped hop is counted (`meshserve_hops_stripped`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from meshnode.api.access import from_member
from meshnode.api.status import maps_errors, status_of
from meshnode.control.model_control import ModelControl
from meshnode.control.registration import read_load, read_unregister
from meshnode.observability.metrics import NodeMetrics
from meshnode.runtimes.base import CallerMetadata
from meshnode.serving.dataplane import DataPlane
from meshpb import pb
from router.hop import HOP_METADATA, PARAMETER_KEY, Hop


def _parameters(params: Any) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, choice) if choice else None
    return out


def _stream_error(request: pb.ModelInferRequest, error: BaseException) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(error_message=status_of(error)[1], infer_response=pb.ModelInferResponse(
        id=request.id, model_name=request.model_name, model_version=request.model_version))


class InferenceServicer:
    def __init__(self, dataplane: DataPlane, control: ModelControl, metrics: NodeMetrics) -> None:
        self._dataplane = dataplane
        self._control = control
        self._metrics = metrics

    def _caller_metadata(self, context: Any) -> CallerMetadata:
        """The call's metadata as the dataplane may read it: without hop entries unless a member sent it."""
        if from_member():
            return context.invocation_metadata  # type: ignore[no-any-return]
        metadata: tuple[tuple[str, Any], ...] = tuple(context.invocation_metadata() or ())
        if not any(key in HOP_METADATA for key, _ in metadata):
            return context.invocation_metadata  # type: ignore[no-any-return]
        self._metrics.hops_stripped += 1
        kept = tuple((key, value) for key, value in metadata if key not in HOP_METADATA)
        return lambda: kept

    def _without_forged_hop(self, request: pb.ModelInferRequest) -> pb.ModelInferRequest:
        if PARAMETER_KEY in request.parameters and not from_member():
            del request.parameters[PARAMETER_KEY]
            self._metrics.hops_stripped += 1
        return request

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {name: getattr(self, name) for name in (
            "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
            "ModelStreamInfer", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")}

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._dataplane.ready)

    @maps_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._dataplane.model_ready(request.name, request.version))

    @maps_errors
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return self._dataplane.server_metadata()

    @maps_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        forwarded = Hop.from_metadata(self._caller_metadata(context)()).hops > 0
        return await self._dataplane.model_metadata(request.name, request.version, forwarded)

    @maps_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return await self._dataplane.infer(self._without_forged_hop(request), self._caller_metadata(context),
                                           context.time_remaining)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Triton's stream semantics: an error answers that request and the stream goes on.
        checked = (self._without_forged_hop(request) async for request in requests)
        async for response in self._dataplane.stream(checked, _stream_error, self._caller_metadata(context),
                                                     context.time_remaining):
            yield response

    @maps_errors
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in self._control.index(request.ready)
        ])

    @maps_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        await self._control.load(read_load(request.model_name, _parameters(request.parameters)))
        return pb.RepositoryModelLoadResponse()

    @maps_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self._control.unload(request.model_name, read_unregister(_parameters(request.parameters)))
        return pb.RepositoryModelUnloadResponse()
