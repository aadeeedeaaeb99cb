"""Thin gRPC handlers of meshserve's management service: convert, call meshnode.management."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from meshnode.api.status import maps_errors
from meshnode.control.management import Management, ModelStatus
from meshnode.control.registration import Registration
from meshnode.state.aliases import AliasRecord
from meshpb import MANAGEMENT_METHODS, mpb
from placement.types import NodeView

# A switch loads copies first; without a client deadline, it may take this long.
SET_ALIAS_BUDGET_S = 300.0


def _model(status: ModelStatus) -> mpb.ModelStatus:
    r = status.record
    copies = [mpb.ModelCopy(instance_id=n, state=c["state"], since=c["since"])
              for n, c in sorted(status.copies.items())]
    failures = [mpb.LoadFailure(instance_id=n, at=f["at"], message=f["message"])
                for n, f in sorted(status.failures.items())]
    return mpb.ModelStatus(
        name=r.name, storage_uri=r.storage, state=status.state, reason=status.reason, copies=copies, failures=failures,
        size_bytes=r.size_bytes or 0, last_used=r.last_used or 0.0, pinned=r.pinned, min_copies=r.min_copies,
        load_timeout_s=r.load_timeout_s or 0.0, size_hint_bytes=r.size_hint or 0, registered_at=r.registered_at,
        aliases=status.aliases, runtime=r.runtime, timeout_ms=r.timeout_ms or 0,
    )


def _alias(record: AliasRecord) -> mpb.Alias:
    return mpb.Alias(alias=record.alias, model=record.model, auto_delete=record.auto_delete,
                     switching_to=record.switching_to or "", last_error=record.last_error or "",
                     updated_at=record.updated_at, previous_model=record.previous_model or "")


def _node(node: NodeView, now: float) -> mpb.Node:
    age = node.cache_age_s(now)
    return mpb.Node(instance_id=node.instance_id, endpoint=node.endpoint, capacity_bytes=node.capacity_bytes,
                    used_bytes=node.used_bytes, model_count=node.model_count,
                    cache_age_s=age if age != float("inf") else 0.0, request_rate=node.request_rate,
                    inflight=node.inflight, loads_in_progress=node.loads_in_progress,
                    shutting_down=node.shutting_down, version=node.version, runtime=node.runtime)


class ManagementServicer:
    def __init__(self, management: Management, clock: Callable[[], float] = time.time) -> None:
        self._management = management
        self._now = clock

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {name: getattr(self, name) for name in MANAGEMENT_METHODS}

    @maps_errors
    async def RegisterModel(self, request: mpb.RegisterModelRequest, context: Any) -> mpb.ModelStatus:
        return _model(await self._management.register(Registration(
            # Unset (zero) fields keep what an existing registration says, as an absent config key does.
            name=request.name, storage_uri=request.storage_uri, lazy=request.lazy,
            size_hint_bytes=request.size_hint_bytes or None, pinned=request.pinned or None,
            min_copies=request.min_copies or None, load_timeout_s=request.load_timeout_s or None,
            timeout_ms=request.timeout_ms or None,
            runtime=("" if request.runtime == "any" else request.runtime) if request.HasField("runtime") else None)))

    @maps_errors
    async def UnregisterModel(self, request: mpb.UnregisterModelRequest, context: Any) -> mpb.UnregisterModelResponse:
        await self._management.unregister(request.name)
        return mpb.UnregisterModelResponse()

    @maps_errors
    async def GetModelStatus(self, request: mpb.GetModelStatusRequest, context: Any) -> mpb.ModelStatus:
        return _model(self._management.status(request.name))

    @maps_errors
    async def ListModels(self, request: mpb.ListModelsRequest, context: Any) -> mpb.ListModelsResponse:
        models, token = self._management.list_models(request.prefix, request.page_size, request.page_token)
        return mpb.ListModelsResponse(models=[_model(m) for m in models], next_page_token=token)

    @maps_errors
    async def SetAlias(self, request: mpb.SetAliasRequest, context: Any) -> mpb.Alias:
        remaining = context.time_remaining()
        budget = SET_ALIAS_BUDGET_S if remaining is None else remaining
        return _alias(await self._management.set_alias(request.alias, request.model, request.auto_delete, budget))

    @maps_errors
    async def GetAlias(self, request: mpb.GetAliasRequest, context: Any) -> mpb.Alias:
        return _alias(self._management.get_alias(request.alias))

    @maps_errors
    async def DeleteAlias(self, request: mpb.DeleteAliasRequest, context: Any) -> mpb.DeleteAliasResponse:
        await self._management.delete_alias(request.alias)
        return mpb.DeleteAliasResponse()

    @maps_errors
    async def ListAliases(self, request: mpb.ListAliasesRequest, context: Any) -> mpb.ListAliasesResponse:
        aliases, token = self._management.list_aliases(request.prefix, request.page_size, request.page_token)
        return mpb.ListAliasesResponse(aliases=[_alias(a) for a in aliases], next_page_token=token)

    @maps_errors
    async def ListNodes(self, request: mpb.ListNodesRequest, context: Any) -> mpb.ListNodesResponse:
        now = self._now()
        return mpb.ListNodesResponse(nodes=[_node(n, now) for n in self._management.nodes()])
