"""The mesh's exception root and the statuses it maps to.

meshnode's errors derive from MeshError too, so one handler at the gRPC edge maps them all.
"""

from __future__ import annotations

import grpc


class MeshError(Exception):
    """Root of every error a client may see; `code` is its gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # Whether another node might succeed where this one failed (a load failure, a node going away).
    retry_elsewhere: bool = False
    # The node that failed, when known: sent apart from the message (trailing metadata, NODE_KEY), so that a
    # forwarded request's error reads exactly as the same error on the node the client called.
    node: str | None = None


NODE_KEY = "meshserve-node"


class PeerError(MeshError):
    """A forwarded request failed at or on the way to a peer."""

    def __init__(self, code: grpc.StatusCode, message: str, *, retry_elsewhere: bool, node: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_elsewhere = retry_elsewhere
        self.node = node


NOT_HERE_PREFIX = "not here: "


class NotHere(MeshError):
    """A peer was asked for a copy it does not hold (any more): try the next copy.

    Its message starts with NOT_HERE_PREFIX so the sender can tell it from a node going away.
    """

    code = grpc.StatusCode.UNAVAILABLE
    retry_elsewhere = True

    def __init__(self, message: str) -> None:
        super().__init__(NOT_HERE_PREFIX + message)


OVERLOADED_PREFIX = "overloaded: "


class Overloaded(MeshError):
    """A copy (or the whole node) is at its bound of waiting or in-flight requests: try another copy now,
    never queue without bound. When every live copy of the model says so, the router raises one naming
    the model and its copies, and starts no load for it (overload is the copies' traffic, not a miss).

    RESOURCE_EXHAUSTED, like a node without room for a load; its message starts with OVERLOADED_PREFIX
    so the sender of a forwarded request can tell the two apart (meshnode.net.peers.peer_error).
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_elsewhere = True

    def __init__(self, message: str) -> None:
        super().__init__(message if message.startswith(OVERLOADED_PREFIX) else OVERLOADED_PREFIX + message)


class NoPlacement(MeshError):
    """No node in the mesh can take the model now."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class GaveUp(MeshError):
    """Bounded retries are spent; the message names the model and the last cause."""

    code = grpc.StatusCode.UNAVAILABLE


class OutOfTime(MeshError):
    """The request's deadline passed while the mesh was still trying."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


# Statuses from a peer that say "this node, not this request": another node may well succeed.
RETRY_ELSEWHERE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
})
