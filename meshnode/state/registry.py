"""The model registry: one JSON record per model under `models/<name>` in etcd, and a local view of it.

The view (meshnode.state.watched_records) is a dict kept current by a watch, so the request path looks a
model up without waiting on etcd. Writes go through compare-and-set, so concurrent nodes never lose
each other's updates, and are applied to the view at once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

from meshnode.etcd.store import EtcdStore
from meshnode.state.records import JsonRecord
from meshnode.state.watched_records import WatchedRecords

PREFIX = "models/"

class Failure(TypedDict):
    at: float
    message: str


class Copy(TypedDict):
    state: str  # placement.types.LOADING or LOADED
    since: float
    # The versions held there, ascending; absent in records of older nodes and in load claims.
    versions: NotRequired[list[str]]


# The default of `copies.get(instance_id, NO_COPY)`: no copy there, so no state.
NO_COPY: Mapping[str, object] = {}


@dataclass
class ModelRecord(JsonRecord):
    name: str
    storage: str  # absolute path: a Triton-layout model directory, or a single model file
    enabled: bool = True  # False after RepositoryModelUnload: not served until loaded again
    size_hint: int | None = None
    registered_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    copies: dict[str, Copy] = field(default_factory=dict)  # instance id -> its copy
    failures: dict[str, Failure] = field(default_factory=dict)  # instance id -> its last load failure
    last_used: float | None = None  # updated lazily, at most every few tens of seconds
    size_bytes: int | None = None  # measured by the last node that loaded it
    pinned: bool = False  # never evicted once loaded
    min_copies: int = 1  # the mesh keeps at least this many copies loaded
    load_timeout_s: float | None = None  # None: each node's default
    timeout_ms: int | None = None  # an inference running longer is abandoned (DEADLINE_EXCEEDED); None: no limit
    runtime: str = ""  # only nodes running this runtime load it ("onnxruntime", "triton"); "" for any
    # Pointed at by an alias with auto_delete: unregistered once no alias points at it any more.
    delete_when_unaliased: bool = False
    # Bumped by a re-registration with other files or storage: a copy loaded under an older one is stale.
    generation: int = 0
    # The remote repository whose listing registered it (meshnode.control.repository_sync): it follows that
    # store, unregistered once the store no longer lists it. "" for a model registered through the API.
    origin: str = ""
    # Fields written by newer versions, kept as read so a read-modify-write here does not drop them.
    extra: dict[str, Any] = field(default_factory=dict)

    def runs_on(self, runtime: str) -> bool:
        """Whether a node running `runtime` may load it."""
        return self.runtime in ("", runtime)

    def effective_size(self, predicted: Callable[[], int]) -> int:
        """The bytes the mesh counts for the model: the registered hint (its owner knows what its code
        pulls in), else what a node measured once loaded, else `predicted()` from its files."""
        return self.size_hint or self.size_bytes or predicted()

    def live_copies(self, live: Container[str]) -> dict[str, Copy]:
        """Its copies on nodes in `live`: a dead node's entry lingers until a janitor removes it."""
        return {node: copy for node, copy in self.copies.items() if node in live}


def key_of(name: str) -> str:
    return PREFIX + name


class Registry(WatchedRecords[ModelRecord]):
    def __init__(self, store: EtcdStore) -> None:
        super().__init__(store, PREFIX, ModelRecord)

    @property
    def view(self) -> Mapping[str, ModelRecord]:
        """The view itself, kept current in place: for the request path, where `view.get(name)` is one dict get
        (no call of `get`)."""
        return self._watched.view

    # --- writes, all compare-and-set on etcd, reflected in the view at once ---

    async def register_if_absent(self, record: ModelRecord) -> bool:
        return self._applied(record.name, record, await self._store.create(self.key(record.name),
                                                                           record.to_json())) is not None

    async def update(self, name: str, fn: Callable[[ModelRecord | None], ModelRecord | None]) -> ModelRecord | None:
        """Apply fn to the current record (a private copy) until the write wins; None from fn deletes.

        fn must say what the record should become (it can run again, see EtcdStore.update).
        updated_at is stamped on every real change.
        """

        def apply(raw: bytes | None) -> bytes | None:
            old = ModelRecord.decode(name, raw) if raw is not None else None
            new = fn(ModelRecord.decode(name, raw) if raw is not None else None)
            if new is None:
                return None
            if new == old:
                return raw
            return dataclasses.replace(new, updated_at=time.time()).to_json()

        raw, revision = await self._store.update_versioned(self.key(name), apply)
        record = ModelRecord.decode(name, raw) if raw is not None else None
        self._applied(name, record, revision)
        return record
