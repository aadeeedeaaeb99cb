"""peer_error: a peer's status as the router sees it, and a peer's overload told apart from "no room"."""

from __future__ import annotations

import grpc
import pytest

from meshnode.net.peers import peer_error
from router.errors import OVERLOADED_PREFIX, Overloaded, PeerError


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_a_peers_overload_comes_back_as_overloaded_from_the_peer() -> None:
    details = OVERLOADED_PREFIX + "model 'm' has 32 requests waiting on node n1, its limit"
    error = peer_error("n1", rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, details))
    assert isinstance(error, Overloaded)
    assert str(error) == details and error.node == "n1"
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_elsewhere


@pytest.mark.parametrize(("code", "details"), [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "no room for model 'm' (100 bytes) on this node"),
    (grpc.StatusCode.UNAVAILABLE, OVERLOADED_PREFIX + "not from a meshserve copy: the status decides"),
])
def test_anything_else_stays_a_peer_error(code: grpc.StatusCode, details: str) -> None:
    error = peer_error("n1", rpc_error(code, details))
    assert type(error) is PeerError and error.code == code and error.retry_elsewhere
    assert str(error) == details and error.node == "n1"  # worded as the peer did: the node travels apart
