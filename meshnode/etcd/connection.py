"""How the store reaches etcd: one of several endpoints at a time, over TLS if asked, authenticated.

aetcd 1.0.0 always opens a plaintext channel; the client below opens it through meshnode.net.transport
(TLS, etcd's client certificate) and authenticates itself. aetcd sends `metadata` (the token) with each of
its calls; the store's own ranges and watch streams send it too. etcd's simple
tokens live in one member's memory: after a fail-over or a restart the token is refused and the client
authenticates again. A failed endpoint hands over to the next one in the list; each keeps its channel,
so going back to it later reconnects nothing by hand.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rpc, watcher

from meshnode.etcd.types import EtcdError, EtcdUnavailable, grpc_status, is_transient
from meshnode.net import transport
from meshnode.net.tls import ClientTls

T = TypeVar("T")


class TokenRefused(Exception):
    """etcd refused the auth token in a way that carries no status (a watch canceled: permission denied)."""


@dataclass(frozen=True)
class EtcdAccess:
    endpoints: tuple[str, ...]
    tls: ClientTls | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("etcd needs at least one endpoint HOST:PORT")
        for endpoint in self.endpoints:
            host, _, port = endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"etcd endpoint must be HOST:PORT, got {endpoint!r}")
        if (self.user is None) != (self.password is None):
            raise ValueError("an etcd user needs its password, and a password its user")

    @classmethod
    def plain(cls, endpoint: str) -> EtcdAccess:
        return cls(tuple(e.strip() for e in endpoint.split(",") if e.strip()))


class _Client(aetcd.Client):  # type: ignore[misc]  # aetcd has no type information
    """aetcd's client over meshnode.net.transport's channel, authenticated by us (aetcd sends `metadata`)."""

    def __init__(self, endpoint: str, access: EtcdAccess, timeout: float, options: dict[str, Any]) -> None:
        host, _, port = endpoint.rpartition(":")
        super().__init__(host=host, port=int(port), timeout=timeout, options=options)
        self.endpoint = endpoint
        self._access = access
        self._auth_lock = asyncio.Lock()

    async def connect(self) -> None:
        # aetcd's connect, with the channel made by transport and authentication of our own.
        if self._connected.is_set():
            return
        async with self._auth_lock:
            if self._connected.is_set():
                return
            channel = transport.create_channel(self.endpoint, self._access.tls, options=self._options)
            try:
                await self._authenticate(channel)
            except BaseException:
                await channel.close()
                raise
            self.channel = channel
            self.kvstub = rpc.KVStub(channel)
            self.clusterstub = rpc.ClusterStub(channel)
            self.leasestub = rpc.LeaseStub(channel)
            self.maintenancestub = rpc.MaintenanceStub(channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(channel), timeout=self._timeout)
            self._connected.set()

    async def _authenticate(self, channel: grpc.aio.Channel) -> None:
        if self._access.user is None:
            return
        reply = await rpc.AuthStub(channel).Authenticate(
            rpc.AuthenticateRequest(name=self._access.user, password=self._access.password), timeout=self._timeout)
        self.metadata = (("token", reply.token),)

    async def reauthenticate(self, refused: str | None) -> None:
        """The token `refused` was refused: get a new one, once for all the calls that saw it refused."""
        async with self._auth_lock:
            if self.channel is not None and self.token == refused:
                await self._authenticate(self.channel)

    @property
    def token(self) -> str | None:
        return str(self.metadata[0][1]) if self.metadata else None


class Connection:
    """The current client; `failed` moves to the next endpoint or authenticates again."""

    def __init__(self, access: EtcdAccess, timeout: float, options: dict[str, Any]) -> None:
        self.access = access
        self._clients = [_Client(e, access, timeout, options) for e in access.endpoints]
        self._current = 0

    @property
    def client(self) -> _Client:
        return self._clients[self._current]

    @property
    def endpoints(self) -> str:
        return ",".join(self.access.endpoints)

    async def failed(self, client: _Client, token: str | None, error: BaseException) -> None:
        """`client`'s call with `token` failed with `error` (which the caller retries)."""
        if self.token_refused(error):
            await client.reauthenticate(token)
        elif is_transient(error) and client is self.client and len(self._clients) > 1:
            self._current = (self._current + 1) % len(self._clients)

    def token_refused(self, error: BaseException) -> bool:
        """Might `error` be etcd refusing a token it forgot (restart, another member)? After a restart etcd
        says so as UNAUTHENTICATED (invalid auth token) or as PERMISSION_DENIED."""
        return self.access.user is not None and (isinstance(error, TokenRefused) or grpc_status(error) in (
            grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED))

    async def retrying(self, what: str, op: Callable[[], Awaitable[T]], retry_window: float) -> T:
        """Run op, retrying transient failures with backoff until retry_window has passed."""
        deadline = time.monotonic() + retry_window
        delay = 0.05
        new_token = False  # a refusal may be etcd forgetting our token: once with a new one, then it stands
        while True:
            client = self.client
            token = client.token
            try:
                return await op()
            except (aetcd.ClientError, grpc.aio.AioRpcError) as e:
                refused = self.token_refused(e) and not new_token
                new_token = new_token or refused
                if not (refused or is_transient(e)):
                    raise EtcdError(f"etcd refused {what}: {e}", grpc_status(e)) from e
                if time.monotonic() + delay > deadline:
                    raise EtcdUnavailable(
                        f"etcd at {self.endpoints} unavailable for {retry_window:g} s ({what}): {e}") from e
                await self._failed(client, token, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def lost(self, channel: grpc.aio.Channel, error: BaseException) -> None:
        client = self.client
        if client.channel is channel:
            await self._failed(client, client.token, error)

    async def _failed(self, client: _Client, token: str | None, error: BaseException) -> None:
        try:
            await self.failed(client, token, error)
        except (aetcd.ClientError, grpc.aio.AioRpcError) as e:
            raise EtcdError(f"etcd refused to authenticate {self.access.user}: {e}", grpc_status(e)) from e

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
