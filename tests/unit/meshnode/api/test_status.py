"""The one error -> status map: the project's errors keep their code and message, anything else is INTERNAL."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from meshnode.api.status import MAX_MESSAGE_BYTES, clip_message, maps_errors, status_of, trailing_of
from meshnode.errors import InvalidInput, ModelNotFound
from router.errors import NODE_KEY, GaveUp, PeerError


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.trailing: tuple[tuple[str, str], ...] = ()

    async def abort(self, code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        self.aborted = (code, message)
        self.trailing = trailing
        raise Aborted  # grpc.aio's abort never returns


@pytest.mark.parametrize(("error", "expected"), [
    (ModelNotFound.unknown("m"), (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'm' is not found")),
    (InvalidInput("bad shape for 'INPUT0'"), (grpc.StatusCode.INVALID_ARGUMENT, "bad shape for 'INPUT0'")),
    (GaveUp("model 'm' could not be served"), (grpc.StatusCode.UNAVAILABLE, "model 'm' could not be served")),
    (PeerError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", retry_elsewhere=True, node="n1"),
     (grpc.StatusCode.RESOURCE_EXHAUSTED, "full")),
    (KeyError("x"), (grpc.StatusCode.INTERNAL, "internal error: KeyError: 'x'")),
    (OSError(36, "File name too long", "/srv/models/m/1/" + "a" * 300),
     (grpc.StatusCode.INTERNAL, "internal error: OSError: File name too long")),
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


def test_the_node_that_failed_travels_in_trailing_metadata_not_in_the_message() -> None:
    forwarded = PeerError(grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'm' is not found",
                          retry_elsewhere=False, node="n2")
    assert trailing_of(forwarded) == ((NODE_KEY, "n2"),)
    assert status_of(forwarded)[1] == str(ModelNotFound.unknown("m"))  # as a local one reads
    assert trailing_of(ModelNotFound.unknown("m")) == () and trailing_of(KeyError("x")) == ()


class ForwardingServicer:
    @maps_errors
    async def Fails(self, request: Any, context: Any) -> str:
        raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, "bad", retry_elsewhere=False, node=request)


async def test_maps_errors_sends_the_node_as_trailing_metadata() -> None:
    context = FakeContext()
    with pytest.raises(Aborted):
        await ForwardingServicer().Fails("n3", context)
    assert context.aborted == (grpc.StatusCode.INVALID_ARGUMENT, "bad") and context.trailing == ((NODE_KEY, "n3"),)
