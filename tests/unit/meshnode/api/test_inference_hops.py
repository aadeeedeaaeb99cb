"""The api edge strips a hop a non-member sent, in the request's parameters or its metadata, and counts it."""

from __future__ import annotations

from typing import Any

from meshnode.api.access import Access
from meshnode.api.inference import InferenceServicer
from meshnode.observability.metrics import NodeMetrics
from meshpb import pb
from router.hop import PARAMETER_KEY, Hop, Mode


class DataPlane:
    def __init__(self) -> None:
        self.seen: list[tuple[pb.ModelInferRequest, tuple[tuple[str, Any], ...]]] = []
        self.forwarded: list[bool] = []

    async def infer(self, request: pb.ModelInferRequest, metadata: Any, time_remaining: Any) -> pb.ModelInferResponse:
        self.seen.append((request, tuple(metadata() or ())))
        return pb.ModelInferResponse(model_name=request.model_name)

    async def model_metadata(self, name: str, version: str, forwarded: bool) -> pb.ModelMetadataResponse:
        self.forwarded.append(forwarded)
        return pb.ModelMetadataResponse(name=name)


class Context:
    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None


def forged() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.parameters[PARAMETER_KEY].string_param = "0|load-last|"
    return request


def serve(members: bool) -> tuple[dict[str, Any], DataPlane, NodeMetrics]:
    dataplane, metrics = DataPlane(), NodeMetrics()
    servicer = InferenceServicer(dataplane, control=None, metrics=metrics)  # type: ignore[arg-type]
    return Access(members=members).guard(servicer.handlers()), dataplane, metrics


async def test_a_non_members_hop_is_stripped_and_counted() -> None:
    handlers, dataplane, metrics = serve(members=False)
    await handlers["ModelInfer"](forged(), Context((("traceparent", "00-ab-cd-01"),)))
    await handlers["ModelInfer"](pb.ModelInferRequest(model_name="m"),
                                 Context((("meshserve-mode", "load-last"), ("traceparent", "00-ab-cd-01"))))
    (first, first_metadata), (second, second_metadata) = dataplane.seen
    assert PARAMETER_KEY not in first.parameters and first_metadata == (("traceparent", "00-ab-cd-01"),)
    assert second_metadata == (("traceparent", "00-ab-cd-01"),)  # trace context goes on, the mode does not
    assert metrics.hops_stripped == 2
    await handlers["ModelMetadata"](pb.ModelMetadataRequest(name="m"), Context(Hop(1, mode=Mode.COPY).to_metadata()))
    assert dataplane.forwarded == [False] and metrics.hops_stripped == 3


async def test_a_members_hop_is_honoured() -> None:
    handlers, dataplane, metrics = serve(members=True)
    await handlers["ModelInfer"](forged(), Context((("meshserve-mode", "load"),)))
    request, metadata = dataplane.seen[0]
    assert request.parameters[PARAMETER_KEY].string_param == "0|load-last|"
    assert metadata == (("meshserve-mode", "load"),)
    await handlers["ModelMetadata"](pb.ModelMetadataRequest(name="m"), Context(Hop(1, mode=Mode.COPY).to_metadata()))
    assert dataplane.forwarded == [True] and metrics.hops_stripped == 0


async def test_a_plain_client_request_is_untouched_and_not_counted() -> None:
    handlers, dataplane, metrics = serve(members=False)
    await handlers["ModelInfer"](pb.ModelInferRequest(model_name="m"), Context())
    assert len(dataplane.seen) == 1 and metrics.hops_stripped == 0
