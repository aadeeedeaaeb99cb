"""A node's storage parts built from its settings' values: the store client, the disk tier, the model files
seen from the load path and the registration rules (meshnode.node calls `open_storage`, `close` at stop)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meshnode.storage.disk_cache import DiskCache
from meshnode.storage.locations import Locations
from meshnode.storage.materializer import Materializer
from meshnode.storage.model_files import ModelFiles, is_remote
from meshnode.storage.remote import ObjectStore
from meshnode.storage.repository import ModelRepository
from meshnode.storage.uris import StoreOptions


@dataclass(frozen=True, slots=True)
class NodeStorage:
    store: ObjectStore
    files: ModelFiles
    locations: Locations
    # The local repository scanned at start; None when the repository is a store's (followed by a poller).
    local_repository: ModelRepository | None
    _temporary_disk_cache: Path | None

    def close(self) -> None:
        if self._temporary_disk_cache is not None:
            shutil.rmtree(self._temporary_disk_cache, ignore_errors=True)


def open_storage(*, repository: str, model_store: str | None, allowed: Sequence[str], disk_cache: Path | None,
                 disk_cache_size: int, options: StoreOptions) -> NodeStorage:
    # Without a directory of its own, the disk tier lives as long as the node: two nodes must not share one.
    directory = disk_cache if disk_cache is not None else Path(tempfile.mkdtemp(prefix="meshserve-disk-cache-"))
    temporary = directory if disk_cache is None else None
    store = ObjectStore(options)
    cache = DiskCache(directory, max_bytes=disk_cache_size)
    local = None if is_remote(repository) else ModelRepository(Path(repository.removeprefix("file://")))
    return NodeStorage(store=store, files=ModelFiles(Materializer(store, cache)),
                       locations=Locations(store, model_store or repository, allowed), local_repository=local,
                       _temporary_disk_cache=temporary)
