"""The long-running etcd call: prefix watches that resume across outages.

The watch runs its own gRPC stream rather than aetcd's shared Watcher: after the server goes away
and comes back, aetcd 1.0.0 accepts new watches on that Watcher but delivers no events to them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Literal, Protocol

import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from meshnode.etcd.connection import TokenRefused
from meshnode.etcd.types import EtcdError, WatchEvent, WatchResync, is_transient


class StreamHost(Protocol):
    """What the streams need of the store that owns them (meshnode.etcd.store.EtcdStore): its keys,
    its channel and the newest revision it has seen."""

    highest_revision: int

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None: ...

    def full_key(self, key: str) -> bytes: ...
    def relative_key(self, full: bytes) -> str: ...
    async def channel(self) -> grpc.aio.Channel: ...
    async def lost(self, channel: grpc.aio.Channel, error: BaseException) -> None: ...

log = logging.getLogger(__name__)

_MAX_DELAY = 1.0


_REFUSED_TOKEN = re.compile("permission denied|invalid auth token", re.IGNORECASE)


def _resumable(error: grpc.aio.AioRpcError) -> bool:
    """Worth watching again: a lost connection, a token etcd forgot, or a stream reset as etcd shuts down
    (over TLS that ends the stream INTERNAL, RST_STREAM). A watch only reads: resuming it is always safe."""
    return is_transient(error) or error.code() == grpc.StatusCode.UNAUTHENTICATED or (
        error.code() == grpc.StatusCode.INTERNAL and "RST_STREAM" in (error.details() or ""))


class _StreamEnded(Exception):
    """etcd closed the watch stream without an error status (it is shutting down)."""


async def watch_prefix(store: StreamHost, key_prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
    """Yield every change under key_prefix from start_revision on, in revision order, forever.

    A lost connection is retried without end (the caller cancels to stop) and the stream resumes
    at the revision after the last one seen, so no event is lost or repeated.
    """
    start = store.full_key(key_prefix)
    create = rpc.WatchCreateRequest(key=start, range_end=prefix_range_end(start), progress_notify=True)
    next_revision = start_revision
    delay = 0.05
    down_since: float | None = None
    token_retried = False
    while True:
        call = channel = None
        try:
            channel = await store.channel()
            call = rpc.WatchStub(channel).Watch(metadata=store.metadata)
            create.start_revision = next_revision
            # Taken before the request goes out: etcd had applied every revision seen so far
            # before it creates the watch, so its current revision cannot be lower.
            seen = max(next_revision - 1, store.highest_revision)
            await call.write(rpc.WatchRequest(create_request=create))
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise _StreamEnded
                if resp.compact_revision:
                    raise WatchResync(
                        f"watch on {key_prefix}: history before revision "
                        f"{resp.compact_revision} compacted, needed {next_revision}"
                    )
                if resp.canceled:
                    if _REFUSED_TOKEN.search(resp.cancel_reason) and not token_retried:
                        # After a restart etcd forgot our token and says so this way to a watch (permission
                        # denied, or invalid auth token): once per token, authenticate again and watch again.
                        token_retried = True
                        raise TokenRefused(resp.cancel_reason)
                    raise WatchResync(f"watch on {key_prefix} canceled by etcd: {resp.cancel_reason}")
                if resp.created:
                    if resp.header.revision < seen:
                        # Forget the lost history, or every later watch would fail the same way.
                        store.highest_revision = resp.header.revision
                        raise WatchResync(
                            f"etcd is at revision {resp.header.revision}, behind the {seen} "
                            "already seen: it lost its data"
                        )
                    if down_since is not None:
                        log.info(
                            "watch on %s resumed at revision %d after %.1f s",
                            key_prefix,
                            next_revision,
                            time.monotonic() - down_since,
                        )
                    delay, down_since = 0.05, None
                    continue
                if not resp.events:
                    # A progress notice: nothing for us up to here, so a later resume can start
                    # past it and not from a revision etcd may have compacted meanwhile.
                    next_revision = max(next_revision, resp.header.revision + 1)
                    continue
                token_retried = False
                for ev in resp.events:
                    next_revision = ev.kv.mod_revision + 1
                    kind: Literal["put", "delete"] = "delete" if ev.type == rpc.Event.DELETE else "put"
                    yield WatchEvent(kind, store.relative_key(ev.kv.key), ev.kv.value, ev.kv.mod_revision)
        except (_StreamEnded, grpc.aio.AioRpcError, asyncio.InvalidStateError, TokenRefused) as e:
            if isinstance(e, TokenRefused) and channel is not None:
                await store.lost(channel, e)
            if isinstance(e, grpc.aio.AioRpcError):
                if channel is not None:
                    await store.lost(channel, e)
                if not _resumable(e):
                    raise EtcdError(f"etcd refused the watch on {key_prefix}: {e.details()}", e.code()) from e
            if down_since is None:
                down_since = time.monotonic()
                log.warning(
                    "watch on %s lost (%s); resuming from revision %d",
                    key_prefix,
                    e.details() if isinstance(e, grpc.aio.AioRpcError) else type(e).__name__,
                    next_revision,
                )
        finally:
            if call is not None:
                call.cancel()
        await asyncio.sleep(delay)
        delay = min(delay * 2, _MAX_DELAY)
