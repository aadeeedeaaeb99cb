"""The node's only door to etcd: relative keys under one prefix, compare-and-set writes, bounded retries.

Every call either succeeds or raises EtcdUnavailable within about `retry_window` seconds; nothing
waits on etcd forever. Writes return the revision they happened at, so a caller that keeps a
watched view can apply its own write at once and still ignore an older event arriving later.
The long-running parts, watches and lease keep-alives, are in meshnode.etcd.streams, and the
errors and value types in meshnode.etcd.types; import them all from here.
"""

from __future__ import annotations

import asyncio
import functools
import json
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import aetcd
import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from meshnode.etcd.connection import Connection, EtcdAccess
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

# Re-exported: callers import the whole etcd layer from this module.
__all__ = ["Entry", "EtcdConflict", "EtcdError", "EtcdStore", "EtcdUnavailable", "KeepAlive"]
__all__ += ["EtcdAccess", "Lease", "WatchEvent", "WatchResync"]

T = TypeVar("T")

# aetcd.Client.transaction's answer (aetcd has no type information): whether the compares held, and a result
# per operation run: etcd's ResponseOp for a put or a delete; for a get, the key's (value, aetcd.rtypes.Get)
# pairs, empty when it is absent.
_TxnResult = tuple[bool, list[Any]]

PAGE_SIZE = 1000
MAX_PAGE = 50_000
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


class EtcdStore:
    """Keys relative to `prefix + "/"`; build with `await EtcdStore.connect(...)`."""

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
        # Updates of one key from this process queue here instead of racing each other in etcd:
        # compare-and-set retries are then only spent on other processes' writes.
        self._update_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    @property
    def _client(self) -> aetcd.Client:
        return self._connection.client

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
        """The client's gRPC channel, for the streaming calls in meshnode.etcd_streams."""
        await self._client.connect()
        assert self._client.channel is not None
        return cast(grpc.aio.Channel, self._client.channel)

    async def lost(self, channel: grpc.aio.Channel, error: BaseException) -> None:
        """A stream on `channel` failed with `error`: fail over, or authenticate again, as a call would."""
        await self._connection.lost(channel, error)

    async def retrying(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run op, retrying transient failures with backoff until retry_window has passed."""
        return await self._connection.retrying(what, op, self.retry_window)

    # --- reads ---

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """(value, mod_revision) or None if absent."""
        got = await self.retrying(f"get {key}", lambda: self._client.get(self.full_key(key)))
        if got is None:
            return None
        self._seen(got.header.revision)
        return got.value, got.mod_revision

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
        revision = 0
        limit = PAGE_SIZE
        while True:
            request = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision)
            try:
                resp = await self.retrying(f"list {key_prefix}", functools.partial(self._range, request))
            except EtcdError as e:
                if e.etcd_status == grpc.StatusCode.OUT_OF_RANGE:
                    raise WatchResync(f"listing of {key_prefix} at revision {revision} compacted") from e
                raise
            if revision == 0:
                # Later pages read at the first page's revision so the listing is one snapshot.
                revision = self._seen(resp.header.revision)
                # etcd 3.4 walks the whole rest of the range for every page (the limit is applied after): pages
                # of 1,000 made a listing of 1,000,000 keys cost etcd 500,000,000 steps and two minutes. A
                # twentieth of the keys a page (at most MAX_PAGE): twenty pages, each a small share of the memory
                # the listed view takes.
                limit = min(MAX_PAGE, max(PAGE_SIZE, resp.count // 20))
            yield [Entry(self.relative_key(kv.key), kv.value, kv.mod_revision) for kv in resp.kvs], revision
            if not resp.more:
                return
            start = resp.kvs[-1].key + b"\0"

    async def _range(self, request: rpc.RangeRequest) -> rpc.RangeResponse:
        # aetcd's get_range cannot set limit or revision, which paging needs.
        await self._client.connect()
        assert self._client.kvstub is not None
        return await self._client.kvstub.Range(request, timeout=self.op_timeout, metadata=self.metadata)

    # --- writes: each returns the revision it happened at, or None when it did not happen ---

    async def put(self, key: str, value: object, lease: Lease | None = None) -> int:
        k, v = self.full_key(key), encode(value)
        lease_id = lease.id if lease is not None else None
        self.writes += 1
        done = await self.retrying(f"put {key}", lambda: self._client.put(k, v, lease=lease_id))
        return self._seen(done.header.revision)

    async def delete(self, key: str) -> int | None:
        """Revision of the deletion, or None if the key was absent.

        After a connection lost mid-call the retry may find the key already gone and say None.
        """
        k = self.full_key(key)
        self.writes += 1
        done = await self.retrying(f"delete {key}", lambda: self._client.delete(k))
        return None if done is None else self._seen(done.header.revision)

    async def create(self, key: str, value: object, lease: Lease | None = None) -> int | None:
        """Write only if absent: the revision, or None if the key exists."""
        k = self.full_key(key)
        ok, _, revision = await self._txn(key, self._client.transactions.create(k) == 0, encode(value), lease)
        return revision if ok else None

    async def compare_and_put(
        self, key: str, value: object, expected_mod_revision: int, lease: Lease | None = None
    ) -> int | None:
        """Write if the key's mod_revision is still expected_mod_revision (0: absent)."""
        k = self.full_key(key)
        cmp = self._client.transactions.mod(k) == expected_mod_revision
        ok, _, revision = await self._txn(key, cmp, encode(value), lease)
        return revision if ok else None

    async def commit(self, puts: Mapping[str, object], unchanged: Mapping[str, int],
                     present: Sequence[str] = ()) -> int | None:
        """Write every key of `puts` in one transaction, if each `unchanged` key still has that
        mod_revision (0: absent) and each `present` key exists: the revision, or None if not."""
        tx = self._client.transactions
        compare = [tx.mod(self.full_key(k)) == revision for k, revision in unchanged.items()]
        compare += [tx.version(self.full_key(k)) > 0 for k in present]
        values = {self.full_key(k): encode(v) for k, v in puts.items()}
        tries = 0

        async def attempt() -> _TxnResult:
            nonlocal tries
            tries += 1
            self.writes += 1
            return await self._transaction(
                compare=compare, success=[tx.put(k, v) for k, v in values.items()],
                failure=[tx.get(k) for k in values])

        ok, responses = await self.retrying(f"commit {', '.join(puts)}", attempt)
        if ok:
            return self._seen(responses[0].response_put.header.revision)
        found = [r[0][1] if r else None for r in responses]
        if tries > 1 and all(kv is not None and kv.value == v for kv, v in zip(found, values.values(), strict=True)):
            # An earlier attempt whose answer was lost wrote exactly this: it was ours.
            return self._seen(max(kv.mod_revision for kv in found if kv is not None))
        return None

    async def update(
        self,
        key: str,
        fn: Callable[[bytes | None], bytes | None],
        attempts: int = 1000,
        lease: Lease | None = None,
    ) -> bytes | None:
        """update_versioned without the revision: the value the key now holds."""
        return (await self.update_versioned(key, fn, attempts, lease))[0]

    async def update_versioned(
        self,
        key: str,
        fn: Callable[[bytes | None], bytes | None],
        attempts: int = 1000,
        lease: Lease | None = None,
    ) -> tuple[bytes | None, int]:
        """Read, apply fn, write if unchanged since the read; on a lost race, again with the winner's value.

        fn returning None deletes; returning its input writes nothing. Returns the value and the
        revision it holds at (0 when absent and left absent). fn must say what the record should
        become, not add to it ("set copies[node]", not "count += 1"): if the connection drops
        mid-write, the write may have landed and fn is applied once more to its own result.
        lease: attach the written key to it; etcd drops a key's lease on any put without one.
        attempts: compare-and-set rounds before EtcdConflict; measured with 10 processes updating
        one key nonstop, an update took 5 rounds at the median and 67 at worst.
        """
        lock = self._update_locks.get(key)
        if lock is None:
            lock = self._update_locks[key] = asyncio.Lock()
        async with lock:
            return await self._update(key, fn, attempts, lease)

    async def _update(
        self, key: str, fn: Callable[[bytes | None], bytes | None], attempts: int, lease: Lease | None
    ) -> tuple[bytes | None, int]:
        current = await self.get(key)
        for _ in range(attempts):
            old, revision = current if current is not None else (None, 0)
            new = fn(old)
            if new == old:
                return old, revision
            cmp = self._client.transactions.mod(self.full_key(key)) == revision
            ok, current, written = await self._txn(key, cmp, new, lease)
            if ok:
                return new, written
            # No backoff: the failed transaction brought the winner's value, so this retry is
            # already ahead of anyone starting afresh; sleeping here starved a loser for good.
        raise EtcdConflict(f"update of {key} lost the compare-and-set race {attempts} times")

    def _seen(self, revision: int) -> int:
        self.highest_revision = max(self.highest_revision, revision)
        return int(revision)

    async def _txn(
        self, key: str, compare: object, value: bytes | None, lease: Lease | None
    ) -> tuple[bool, tuple[bytes, int] | None, int]:
        """Compare, then put (value None: delete); reads the key when the compare fails.

        Returns (succeeded, the key's (value, mod_revision) when it failed, revision written).
        """
        tx = self._client.transactions
        k = self.full_key(key)
        write = tx.delete(k) if value is None else tx.put(k, value, lease.id if lease is not None else None)
        tries = 0

        async def attempt() -> _TxnResult:
            nonlocal tries
            tries += 1
            self.writes += 1
            return await self._transaction(compare=[compare], success=[write], failure=[tx.get(k)])

        ok, responses = await self.retrying(f"write {key}", attempt)
        if ok:
            done = responses[0]
            inner = done.response_delete_range if value is None else done.response_put
            return True, None, self._seen(inner.header.revision)
        found = responses[0]
        current = (found[0][1].value, found[0][1].mod_revision) if found else None
        if tries > 1 and value is not None and current is not None and current[0] == value:
            # An earlier attempt whose answer was lost wrote exactly this: it was ours.
            return True, None, current[1]
        return False, current, 0

    async def _transaction(self, compare: list[Any], success: list[Any], failure: list[Any]) -> _TxnResult:
        """aetcd's transaction, typed."""
        result: _TxnResult = await self._client.transaction(compare=compare, success=success, failure=failure)
        return result

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
        """Refresh `lease` every interval (ttl/3) from a thread of its own; see KeepAlive for expiry handling."""
        return KeepAlive(self, self._sibling, lease, interval if interval is not None else lease.ttl / 3, on_lost)

    def _sibling(self) -> EtcdStore:
        """Another store on the same etcd, for another thread's event loop (gRPC channels belong to one loop)."""
        return EtcdStore(self._connection.access, self.prefix, self.op_timeout, self.retry_window)

    def watch_prefix(self, key_prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Events under key_prefix from start_revision on; resumes across etcd restarts without gaps.

        Raises WatchResync if etcd no longer has the history to resume from.
        """
        return watch_prefix(self, key_prefix, start_revision)
