"""Connection: the next endpoint after a lost one, a new token after a refused one; EtcdAccess checks."""

from __future__ import annotations

import grpc
import pytest

from meshnode.etcd.connection import Connection, EtcdAccess, TokenRefused


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "etcd said no")


async def test_a_lost_endpoint_hands_over_to_the_next_once_per_failure() -> None:
    connection = Connection(EtcdAccess(("a:1", "b:2")), 1.0, {})
    first = connection.client
    assert first.endpoint == "a:1"
    await connection.failed(first, None, rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert connection.client.endpoint == "b:2"
    # Another call that failed on the first client meanwhile does not skip past the second.
    await connection.failed(first, None, rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert connection.client.endpoint == "b:2"
    await connection.failed(connection.client, None, rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert connection.client is first
    await connection.failed(first, None, rpc_error(grpc.StatusCode.INVALID_ARGUMENT))
    assert connection.client is first


async def test_a_refused_token_is_replaced_when_a_user_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    connection = Connection(EtcdAccess(("a:1",), user="root", password="pw"), 1.0, {})
    renewed: list[str | None] = []

    async def reauthenticate(refused: str | None) -> None:
        renewed.append(refused)

    monkeypatch.setattr(connection.client, "reauthenticate", reauthenticate)
    for error in (rpc_error(grpc.StatusCode.UNAUTHENTICATED), rpc_error(grpc.StatusCode.PERMISSION_DENIED),
                  TokenRefused("permission denied")):
        assert connection.token_refused(error)
        await connection.failed(connection.client, "old-token", error)
    assert renewed == ["old-token"] * 3
    assert not Connection(EtcdAccess(("a:1",)), 1.0, {}).token_refused(rpc_error(grpc.StatusCode.UNAUTHENTICATED))


@pytest.mark.parametrize(("endpoints", "user", "password", "message"), [
    ((), None, None, "at least one endpoint"),
    (("nohost",), None, None, "HOST:PORT"),
    (("a:1",), "root", None, "password"),
    (("a:1",), None, "pw", "password"),
])
def test_access_is_checked(endpoints: tuple[str, ...], user: str | None, password: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EtcdAccess(endpoints, None, user, password)


def test_the_password_never_shows_in_a_repr() -> None:
    assert "s3cret" not in repr(EtcdAccess(("a:1",), None, "root", "s3cret"))
    assert EtcdAccess.plain("a:1, b:2").endpoints == ("a:1", "b:2")
