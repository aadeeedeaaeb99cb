"""The one error -> status map: the project's errors keep their code and message, anything else is INTERNAL."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from meshnode.api.status import MAX_MESSAGE_BYTES, clip_message, maps_errors, status_of
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


@pytest.mark.parametrize("piece", ["x", "\u00e9", "\U0001f600", "\x00"])
def test_a_long_message_is_clipped_to_stay_under_grpcs_metadata_limit(piece: str) -> None:
    name = piece * 20_000
    code, message = status_of(ModelNotFound.unknown(name))
    assert code == grpc.StatusCode.NOT_FOUND
    assert message.startswith("Request for unknown model: '" + piece * 10)
    assert message.endswith(f"... (message clipped: {len(ModelNotFound.unknown(name).args[0])} characters in all)")
    assert len(message.encode()) <= MAX_MESSAGE_BYTES
    # gRPC percent-encodes every byte that is not printable ASCII: even then under the 8 KiB soft limit
    assert len(message.encode()) * 3 < 8192


def test_a_message_within_the_limit_is_unchanged() -> None:
    message = "m" * MAX_MESSAGE_BYTES
    assert clip_message(message) == message
    assert clip_message(message + "m") != message + "m"
    assert len(clip_message("\u00e9" * MAX_MESSAGE_BYTES).encode()) <= MAX_MESSAGE_BYTES
    assert status_of(ValueError("v" * 50_000))[1].startswith("internal error: ValueError: vvv")
