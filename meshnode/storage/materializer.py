"""A model's storage URI -> a local path a runtime loads: in place for a local path, else through the disk
cache (list the store, reuse a copy whose sizes and ETags still match, else download, verify, extract, keep).

One pull per model at a time on a node (single-flight: concurrent loads of one model share it); a store that
does not answer still serves what is on disk. Counters for the node's metrics are in stats().
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshnode.errors import ModelNotFound, StorageUnavailable
from meshnode.storage.archives import extract
from meshnode.storage.disk_cache import DiskCache
from meshnode.storage.remote import Listing, ObjectStore
from meshnode.storage.repository import resolve_storage_uri
from meshnode.storage.uris import StorageUri, is_archive_name, parse_uri


@dataclass(frozen=True, slots=True)
class StorageStats:
    """What the node exports: bytes and seconds pulled from stores, disk-tier hits and misses, the disk tier's
    size (bytes, models) and how many models it evicted."""

    bytes_pulled: int
    pull_seconds: float
    hits: int
    misses: int
    disk_bytes: int
    disk_models: int
    evictions: int


@dataclass(frozen=True, slots=True)
class _Outcome:
    path: Path
    pulled_bytes: int | None  # None: served from disk
    seconds: float


class Materializer:
    def __init__(self, store: ObjectStore, cache: DiskCache, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._cache = cache
        self._clock = clock
        self._inflight: dict[str, asyncio.Task[_Outcome]] = {}
        self._bytes_pulled = 0
        self._pull_seconds = 0.0
        self._hits = 0
        self._misses = 0

    async def materialize(self, storage_uri: str) -> Path:
        """The local model for `storage_uri`: a directory (Triton layout) or a single model file.

        Raises InvalidInput (a bad URI), ModelNotFound, PermissionDenied, StorageUnavailable (the store does
        not answer and the model is not on disk) or LoadFailed (corrupt, truncated, an unsafe archive)."""
        async with self.materialized(storage_uri) as path:
            return path

    @contextlib.asynccontextmanager
    async def materialized(self, storage_uri: str) -> AsyncIterator[Path]:
        """materialize(), with the disk copy kept from eviction until the block ends (around a load)."""
        uri = parse_uri(storage_uri)
        if uri.is_local and not uri.is_archive:
            yield await asyncio.to_thread(resolve_storage_uri, uri.text)
            return
        key = uri.cache_key
        self._cache.pin(key)
        try:
            yield await self._single_flight(uri)
        finally:
            self._cache.unpin(key)

    async def _single_flight(self, uri: StorageUri) -> Path:
        key = uri.cache_key
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(asyncio.to_thread(self._materialize_now, uri))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        # Shielded: a caller that gives up (its load timed out) leaves the pull to the others and the disk.
        return (await asyncio.shield(task)).path

    def _finished(self, key: str, task: asyncio.Task[_Outcome]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if task.cancelled() or task.exception() is not None:
            return
        outcome = task.result()
        if outcome.pulled_bytes is None:
            self._hits += 1
        else:
            self._misses += 1
            self._bytes_pulled += outcome.pulled_bytes
            self._pull_seconds += outcome.seconds

    def _materialize_now(self, uri: StorageUri) -> _Outcome:
        key = uri.cache_key
        cached = self._cache.lookup(key)
        try:
            listing = self._store.listing(uri)
        except StorageUnavailable:
            if cached is None:
                raise
            self._cache.touch(key)  # the store is down: what is on disk is what we have
            return _Outcome(cached.model, None, 0.0)
        except ModelNotFound:
            if cached is not None:
                self._cache.remove(key)  # gone from the store: the copy follows the store
            raise
        if cached is not None and _unchanged(cached.version, listing):
            self._cache.touch(key)
            return _Outcome(cached.model, None, 0.0)
        return self._pull(uri, listing)

    def _pull(self, uri: StorageUri, listing: Listing) -> _Outcome:
        start = self._clock()
        staging = self._cache.staging(uri.cache_key)
        try:
            model = self._store.fetch(uri, listing, staging / "files")
            if listing.single and is_archive_name(model.name):
                archive = model
                model = extract(archive, staging / "model", uri.shown)
                archive.unlink()
            entry = self._cache.commit(uri.cache_key, staging, model, uri.shown, listing.as_json())
        except BaseException:
            self._cache.discard(staging)
            raise
        self._cache.evict()
        return _Outcome(entry.model, listing.total_bytes, self._clock() - start)

    def cached(self, storage_uri: str) -> Path | None:
        """The model's copy in the disk tier, if any, without asking the store (the request path's view)."""
        entry = self._cache.lookup(parse_uri(storage_uri).cache_key)
        return entry.model if entry is not None else None

    def stats(self) -> StorageStats:
        return StorageStats(self._bytes_pulled, self._pull_seconds, self._hits, self._misses,
                            self._cache.bytes_used, len(self._cache), self._cache.evictions)


def _unchanged(version: Mapping[str, Any], listing: Listing) -> bool:
    """Whether the copy on disk is what the store holds now; a manifest this code cannot read is a change."""
    try:
        return Listing.from_json(version) == listing
    except (KeyError, TypeError, ValueError):
        return False
