"""Where a model may be registered from, and where its uploaded files go.

- `resolve(uri)`: what a registration's storage_uri becomes in the model's record. A local path or file:// is
  resolved to an absolute path that must exist; a store's URI is kept as given, once the store has shown
  something there (a listing, no download). Either way it must lie under one of the allowed prefixes
  (`--allowed-storage`), so a caller cannot make nodes read arbitrary local files or buckets as "models".
- `upload(name, files)`: a RepositoryModelLoad's `file:` parameters, or `meshserve models register` of a local
  path from a client machine, written to the mesh's model store (`--model-store`, by default the repository)
  and registered by that URI, so any node can load them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

from meshnode.errors import PermissionDenied
from meshnode.storage.remote import ObjectStore
from meshnode.storage.repository import resolve_storage_uri
from meshnode.storage.uris import parse_uri


class Locations:
    def __init__(self, store: ObjectStore, model_store: str, allowed: Sequence[str] = ()) -> None:
        self._store = store
        self._model_store = model_store
        # Local prefixes compare as resolved paths (symlinks and '..' cannot step outside them).
        self._allowed = tuple(_normalized(prefix) for prefix in allowed)

    async def resolve(self, uri: str) -> str:
        """The record's storage for `uri`; InvalidInput, ModelNotFound, PermissionDenied, StorageUnavailable."""
        parsed = parse_uri(uri)
        if parsed.is_local and not parsed.is_archive:
            storage = str(await asyncio.to_thread(resolve_storage_uri, uri))
        else:
            storage = uri
        self._check_allowed(storage, parsed.shown)
        if not parsed.is_local:
            await asyncio.to_thread(self._store.listing, parsed)  # NOT_FOUND now rather than at the first load
        return storage

    async def upload(self, name: str, files: Mapping[str, bytes]) -> str:
        return await self._store.write_model(self._model_store, name, files)

    def _check_allowed(self, storage: str, shown: str) -> None:
        if not self._allowed:
            return
        candidate = _normalized(storage)
        if not any(candidate == prefix or candidate.startswith(prefix.rstrip("/") + "/") for prefix in self._allowed):
            raise PermissionDenied(f"storage_uri '{shown}' is outside the storage this mesh may register models "
                                   f"from (--allowed-storage {','.join(self._allowed)})")


def _normalized(location: str) -> str:
    if "://" in location and not location.startswith("file://"):
        return location
    return str(Path(location.removeprefix("file://")).expanduser().resolve())
