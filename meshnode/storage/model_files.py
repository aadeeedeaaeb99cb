"""Where a registered model's files are on this node: a local path in place, a store's through the disk tier.

A model record's `storage` is an absolute local path (registration resolves paths and file:// URIs) or a
store's URI (s3://, http(s)://, gs://, ...). The request path asks `on_disk` (no I/O beyond a dict lookup for a
store's model); a load opens the model with `opened`, which downloads it once if the disk tier lacks it or the
store holds a newer one, and keeps the disk copy from eviction while the load reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from meshnode.errors import InvalidInput, ModelUnavailable
from meshnode.storage.materializer import Materializer, StorageStats
from meshnode.storage.uris import is_archive_name, shown_uri


def is_remote(storage: str) -> bool:
    """A store's URI or an archive rather than a model's local files: what the disk tier serves."""
    return "://" in storage or is_archive_name(storage)


class ModelFiles:
    """`materializer` None: a node without stores, which serves local paths only."""

    def __init__(self, materializer: Materializer | None) -> None:
        self._materializer = materializer

    @contextlib.asynccontextmanager
    async def opened(self, storage: str, timeout_s: float) -> AsyncIterator[Path]:
        """The model's local directory (or single file) for as long as the block runs; a download from a store
        counts against the model's load timeout (ModelUnavailable when it runs out)."""
        if not is_remote(storage):
            yield Path(storage)
            return
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(timeout_s):
                    path = await stack.enter_async_context(self._remote().materialized(storage))
            except TimeoutError:
                raise ModelUnavailable(f"downloading the model from {shown_uri(storage)} timed out after "
                                       f"{timeout_s:g}s") from None
            yield path

    def on_disk(self, storage: str) -> Path | None:
        """The model's local files if this node has them now (a store's model: in the disk tier), else None."""
        if not is_remote(storage):
            return Path(storage)
        return self._materializer.cached(storage) if self._materializer is not None else None

    def stats(self) -> StorageStats | None:
        return self._materializer.stats() if self._materializer is not None else None

    def _remote(self) -> Materializer:
        if self._materializer is None:
            raise InvalidInput("this node reads models from local paths only")
        return self._materializer
