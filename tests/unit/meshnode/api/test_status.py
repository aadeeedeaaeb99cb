"""The one error -> status map: the project's errors keep their code and message, anything else is INTERNAL."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from meshnode.api.status import maps_errors, status_of
from meshnode.errors import InvalidInput, ModelNotFound
from router.errors import GaveUp, PeerError


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.aborted = (code, message)
        raise Aborted  # grpc.aio's abort never returns


@pytest.mark.parametrize(("error", "expected"), [
    (ModelNotFound.unknown("m"), (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'm' is not found")),
    (InvalidInput("bad shape for 'INPUT0'"), (grpc.StatusCode.INVALID_ARGUMENT, "bad shape for 'INPUT0'")),
    (GaveUp("model 'm' could not be served"), (grpc.StatusCode.UNAVAILABLE, "model 'm' could not be served")),
    (PeerError(grpc.StatusCode.RESOURCE_EXHAUSTED, "node n1: full", retry_elsewhere=True),
     (grpc.StatusCode.RESOURCE_EXHAUSTED, "node n1: full")),
    (KeyError("x"), (grpc.StatusCode.INTERNAL, "internal error: KeyError: 'x'")),
])
def test_status_of(error: BaseException, expected: tuple[grpc.StatusCode, str]) -> None:
    assert status_of(error) == expected


class Servicer:
    @maps_errors
    async def Fails(self, request: Any, context: Any) -> str:
        raise ModelNotFound.unknown(request)

    @maps_errors
    async def Answers(self, request: Any, context: Any) -> str:
        return f"hello {request}"


async def test_maps_errors_aborts_with_the_status_and_passes_answers_through() -> None:
    context = FakeContext()
    with pytest.raises(Aborted):
        await Servicer().Fails("m", context)
    assert context.aborted == (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'm' is not found")

    quiet = FakeContext()
    assert await Servicer().Answers("you", quiet) == "hello you"
    assert quiet.aborted is None
