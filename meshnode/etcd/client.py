"""The connection to etcd under one prefix: relative keys, calls retried within a window, the highest revision
seen. The calls themselves are in meshnode.etcd.writes (compare-and-set) and meshnode.etcd.store (reads,
leases, watches).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

import aetcd
import grpc

from meshnode.etcd.connection import Connection, EtcdAccess

T = TypeVar("T")

# grpc's default reconnect backoff grows to 120 s: after an etcd restart the node would sit idle
# for seconds while etcd is back. Keepalive pings (above etcd's 5 s minimum, only while a call
# is open) find a silently dead server under a long-lived watch stream.
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 500,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.max_receive_message_length": 256 * 1024 * 1024,
}


def encode(value: object) -> bytes:
    """Bytes as they are; anything else as compact JSON."""
    if isinstance(value, bytes):
        return value
    return json.dumps(value, separators=(",", ":")).encode()


class EtcdClient:
    """Keys relative to `prefix + "/"` on the etcd that `access` names."""

    def __init__(self, access: EtcdAccess | str, prefix: str, op_timeout: float = 2.0,
                 retry_window: float = 5.0) -> None:
        """access: the endpoints, TLS and user; or just "HOST:PORT[,HOST:PORT...]" in plaintext."""
        access = EtcdAccess.plain(access) if isinstance(access, str) else access
        self._connection = Connection(access, op_timeout, dict(_CHANNEL_OPTIONS))
        self.endpoint = self._connection.endpoints
        self.prefix = prefix.rstrip("/")
        self.op_timeout = op_timeout
        self.retry_window = retry_window
        self._root = (self.prefix + "/").encode()
        # The highest revision any answer has shown. A watch that later finds etcd below it knows
        # etcd lost its data, even for changes the watch itself never delivered.
        self.highest_revision = 0
        self.writes = 0  # write requests sent (retries included): the load this node puts on etcd

    @property
    def _client(self) -> aetcd.Client:
        return self._connection.client

    async def close(self) -> None:
        await self._connection.close()

    def full_key(self, key: str) -> bytes:
        return self._root + key.encode()

    def relative_key(self, full: bytes) -> str:
        return full[len(self._root) :].decode()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """What a call of our own sends: the auth token, when etcd wants one."""
        return cast(tuple[tuple[str, str], ...] | None, self._client.metadata)

    async def channel(self) -> grpc.aio.Channel:
        """The client's gRPC channel, for the streaming calls in meshnode.etcd.streams."""
        await self._client.connect()
        assert self._client.channel is not None
        return cast(grpc.aio.Channel, self._client.channel)

    async def lost(self, channel: grpc.aio.Channel, error: BaseException) -> None:
        """A stream on `channel` failed with `error`: fail over, or authenticate again, as a call would."""
        await self._connection.lost(channel, error)

    async def retrying(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run op, retrying transient failures with backoff until retry_window has passed."""
        return await self._connection.retrying(what, op, self.retry_window)

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """(value, mod_revision) or None if absent."""
        got = await self.retrying(f"get {key}", lambda: self._client.get(self.full_key(key)))
        if got is None:
            return None
        self._seen(got.header.revision)
        return got.value, got.mod_revision

    def _seen(self, revision: int) -> int:
        self.highest_revision = max(self.highest_revision, revision)
        return int(revision)
