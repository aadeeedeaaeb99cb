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

from router.errors import MeshError

log = logging.getLogger(__name__)
R = TypeVar("R")


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, MeshError):
        return error.code, str(error)
    log.exception("unexpected error", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


def maps_errors(
    handler: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]]:
    """A unary handler whose errors end the call with their status and message."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
        try:
            return await handler(self, request, context)
        except Exception as error:
            code, message = status_of(error)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    return wrapper
