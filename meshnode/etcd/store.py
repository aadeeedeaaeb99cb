"""The node's only door to etcd: relative keys under one prefix, compare-and-set writes, bounded retries.

Every call either succeeds or raises EtcdUnavailable within about `retry_window` seconds; nothing
waits on etcd forever. Writes return the revision they happened at, so a caller that keeps a
watched view can apply its own write at once and still ignore an older event arriving later.
The store is built in layers, one module each: the connection under the prefix (meshnode.etcd.client),
writes (meshnode.etcd.writes), and here the paged snapshot reads, leases and watches. The long-running
parts, watches and lease keep-alives, are in meshnode.etcd.streams and meshnode.etcd.keepalive, and the
errors and value types in meshnode.etcd.types; import them all from here.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from meshnode.background import cancel_and_wait
from meshnode.etcd.client import encode
from meshnode.etcd.connection import EtcdAccess
from meshnode.etcd.keepalive import KeepAlive
from meshnode.etcd.streams import watch_prefix
from meshnode.etcd.types import (
    Entry,
    EtcdConflict,
    EtcdError,
    EtcdUnavailable,
    Lease,
    WatchEvent,
    WatchResync,
)
from meshnode.etcd.writes import EtcdWrites

# Re-exported: callers import the whole etcd layer from this module.
__all__ = ["Entry", "EtcdConflict", "EtcdError", "EtcdStore", "EtcdUnavailable", "KeepAlive"]
__all__ += ["EtcdAccess", "Lease", "WatchEvent", "WatchResync", "encode"]

PAGE_SIZE = 1000
MAX_PAGE = 50_000


class EtcdStore(EtcdWrites):
    """Keys relative to `prefix + "/"`; build with `await EtcdStore.connect(...)`."""

    @classmethod
    async def connect(cls, access: EtcdAccess | str, prefix: str, op_timeout: float = 2.0,
                      retry_window: float = 5.0) -> EtcdStore:
        """Open the channel and prove etcd answers (EtcdUnavailable if not within retry_window)."""
        store = cls(access, prefix, op_timeout, retry_window)
        try:
            await store.get("")
        except BaseException:
            await store.close()
            raise
        return store

    # --- paged snapshot reads ---

    async def snapshot_prefix(self, key_prefix: str) -> tuple[list[Entry], int]:
        """All entries under key_prefix at one revision R, and R: watch from R + 1 to miss nothing."""
        while True:
            entries: list[Entry] = []
            revision = 0
            try:
                async for page, revision in self.snapshot_pages(key_prefix):  # noqa: B007 - the last page's
                    entries += page
                return entries, revision
            except WatchResync:
                continue  # R was compacted between two pages: start over at a newer revision

    async def snapshot_pages(self, key_prefix: str) -> AsyncIterator[tuple[list[Entry], int]]:
        """snapshot_prefix a page at a time, each with R, so that a caller holds one page of a million
        entries, not all; WatchResync if R is compacted before the last page (list again)."""
        start = self.full_key(key_prefix)
        end = prefix_range_end(start)
        resp = await self._page(key_prefix, start, end, PAGE_SIZE, 0)
        # Later pages read at the first page's revision so the listing is one snapshot.
        revision = self._seen(resp.header.revision)
        # etcd 3.4 walks the whole rest of the range for every page (the limit is applied after): pages of 1,000
        # made a listing of 1,000,000 keys cost etcd 500,000,000 steps and two minutes. A twentieth of the keys a
        # page (at most MAX_PAGE): twenty pages, each a small share of the memory the listed view takes.
        limit = min(MAX_PAGE, max(PAGE_SIZE, resp.count // 20))
        skip = len(self._root)
        while True:
            # The next page is asked for before this one is handed over: etcd reads it while the caller works.
            following = asyncio.ensure_future(self._page(key_prefix, resp.kvs[-1].key + b"\0", end, limit, revision)
                                              ) if resp.more else None
            try:
                yield [Entry(kv.key[skip:].decode(), kv.value, kv.mod_revision) for kv in resp.kvs], revision
                if following is None:
                    return
                resp = await following
            finally:
                if following is not None and not following.done():
                    await cancel_and_wait(following)  # the caller stopped reading

    async def _page(self, key_prefix: str, start: bytes, end: bytes, limit: int, revision: int) -> rpc.RangeResponse:
        request = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision)
        try:
            return await self.retrying(f"list {key_prefix}", functools.partial(self._range, request))
        except EtcdError as e:
            if e.etcd_status == grpc.StatusCode.OUT_OF_RANGE:
                raise WatchResync(f"listing of {key_prefix} at revision {revision} compacted") from e
            raise

    async def _range(self, request: rpc.RangeRequest) -> rpc.RangeResponse:
        # aetcd's get_range cannot set limit or revision, which paging needs.
        await self._client.connect()
        assert self._client.kvstub is not None
        return await self._client.kvstub.Range(request, timeout=self.op_timeout, metadata=self.metadata)

    # --- leases and watches (meshnode.etcd.streams) ---

    async def grant_lease(self, ttl: int) -> Lease:
        granted = await self.retrying("grant lease", lambda: self._client.lease(ttl))
        return Lease(int(granted.id), ttl)

    async def refresh_lease(self, lease: Lease) -> int:
        """Remaining TTL after one refresh; 0 means the lease has expired."""
        reply = await self.retrying("refresh lease", lambda: self._client.refresh_lease(lease.id))
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease: Lease) -> None:
        """Delete the lease and its keys now; a lease already gone is fine."""
        try:
            await self.retrying("revoke lease", lambda: self._client.revoke_lease(lease.id))
        except EtcdError as e:
            if e.etcd_status != grpc.StatusCode.NOT_FOUND:
                raise

    def keep_alive(
        self,
        lease: Lease,
        interval: float | None = None,
        on_lost: Callable[[Lease], Awaitable[None]] | None = None,
    ) -> KeepAlive:
        """Refresh `lease` every interval (ttl/3) in a task with a channel of its own; see KeepAlive for expiry
        handling."""
        return KeepAlive(self, self._sibling, lease, interval if interval is not None else lease.ttl / 3, on_lost)

    def _sibling(self) -> EtcdStore:
        """Another store on the same etcd: the keep-alive's own channel, which no other call queues on."""
        return EtcdStore(self._connection.access, self.prefix, self.op_timeout, self.retry_window)

    def watch_prefix(self, key_prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Events under key_prefix from start_revision on; resumes across etcd restarts without gaps.

        Raises WatchResync if etcd no longer has the history to resume from.
        """
        return watch_prefix(self, key_prefix, start_revision)
