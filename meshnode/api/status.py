"""The one map from the project's errors to gRPC statuses.

Every error below the api layer derives router.errors.MeshError and carries its status code; anything
else is a bug, logged here and answered INTERNAL, so a client always gets a status and a message.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from router.errors import NODE_KEY, MeshError

log = logging.getLogger(__name__)
R = TypeVar("R")


# The longest status message, in UTF-8 bytes. gRPC sends it as metadata (grpc-message), percent-encoding every
# byte that is not printable ASCII (three characters each), and a client refuses metadata past its limit (8 KiB
# soft, 16 KiB hard by default) with RESOURCE_EXHAUSTED instead of the status: 2 KiB stays under it, however
# encoded, with room for the other metadata. Longer messages only repeat a client's long name or value.
MAX_MESSAGE_BYTES = 2048


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, MeshError):
        return error.code, clip_message(str(error))
    log.exception("unexpected error", exc_info=error)
    # An OS error's text names the server's files: the client gets its reason only (the log has the rest).
    said = error.strerror if isinstance(error, OSError) and error.strerror else error
    return grpc.StatusCode.INTERNAL, clip_message(f"internal error: {type(error).__name__}: {said}")


def trailing_of(error: BaseException) -> tuple[tuple[str, str], ...]:
    """The status's trailing metadata: the node that failed, when the error knows it."""
    node = error.node if isinstance(error, MeshError) else None
    return ((NODE_KEY, node),) if node else ()


def clip_message(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """The message, cut to at most `limit` UTF-8 bytes with a note saying so when longer."""
    encoded = message.encode("utf-8", "surrogatepass")
    if len(encoded) <= limit:
        return message
    note = f"... (message clipped: {len(message)} characters in all)"
    head = encoded[:limit - len(note)].decode("utf-8", "ignore")  # never half a character
    return head + note


def maps_errors(
    handler: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]]:
    """A unary handler whose errors end the call with their status, message and trailing metadata."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
        try:
            return await handler(self, request, context)
        except Exception as error:
            code, message = status_of(error)
            await context.abort(code, message, trailing_of(error))
            raise  # unreachable: abort raises

    return wrapper
