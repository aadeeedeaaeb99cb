"""The model registry: one JSON record per model under `models/<name>` in etcd, and a local view of it.

The view (meshnode.state.watched_records) is a dict kept current by a watch, so the request path looks a
model up without waiting on etcd. It holds the records of models nobody uses compactly, a few dozen bytes of
JSON each read lazily (meshnode.state.compact), so a node holds a million of them. Writes go through
compare-and-set, so concurrent nodes never lose each other's updates, and are applied to the view at once;
a repository is registered in transactions of BATCH records, while the view already answers for the models
about to be registered (`expect`).
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
import re
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

from meshnode.etcd.store import EtcdStore
from meshnode.state.compact import Compact
from meshnode.state.records import JsonRecord
from meshnode.state.watched_records import WatchedRecords

PREFIX = "models/"
BATCH = 128  # etcd's default --max-txn-ops
WRITERS = 4  # transactions of a bulk registration in flight at once
# The fields an unused record has (or had: last_used), spelt as one byte each in the registry's view.
_SHORT = ("storage", "registered_at", "updated_at", "runtime", "last_used")
_DISABLED = b'"enabled":'  # in a record's compact JSON (defaults left out) only when it is false

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
    # A load's ModelConfig as JSON (RepositoryModelLoad's `config`, as in Triton): it replaces the model's
    # config.pbtxt on every node until a load without one. "" for none.
    config_override: str = ""
    # Pointed at by an alias with auto_delete: unregistered once no alias points at it any more.
    delete_when_unaliased: bool = False
    # Bumped by a re-registration with other files or storage: a copy loaded under an older one is stale.
    generation: int = 0
    # The remote repository whose listing registered it (meshnode.control.repository_sync): it follows that
    # store, unregistered once the store no longer lists it. "" for a model registered through the API.
    origin: str = ""
    # Fields written by newer versions, kept as read so a read-modify-write here does not drop them.
    extra: dict[str, Any] = field(default_factory=dict)

    OMIT_DEFAULTS = True  # a million of these in etcd and in each node's view

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


def in_use(record: ModelRecord) -> bool:
    """Copies or failures somewhere: the record is read on request paths, so views keep it decoded."""
    return bool(record.copies or record.failures)


class Registry(WatchedRecords[ModelRecord]):
    def __init__(self, store: EtcdStore) -> None:
        # A record's JSON names copies or failures only when it has some (defaults are left out).
        holding = Compact(ModelRecord, in_use, (b'"copies"', b'"failures"'), short=_SHORT, path="storage")
        super().__init__(store, PREFIX, ModelRecord, holding)
        self._last_used = re.compile(re.escape(holding.shrinking.probe("last_used")) + rb"([-+.eE0-9]+)")
        self._expected: Callable[[str], ModelRecord | None] | None = None

    def expect(self, found: Callable[[str], ModelRecord | None] | None) -> None:
        """Records about to be registered (a repository's registration runs in the background): `get` answers
        a name the view lacks with `found(name)`, and `update` of such a name starts from that record, so its
        first write (a load claim) registers it. None: nothing more is expected."""
        self._expected = found

    def get(self, name: str) -> ModelRecord | None:
        record = self._view.get(name)
        if record is None and self._expected is not None:
            return self._expected(name)
        return record

    def records_in_use(self) -> list[ModelRecord]:
        """The records with copies or failures: a scan for those reads no unused record (of maybe a million)."""
        return [r for r in self._watched.view.values() if type(r) is not bytes]  # type: ignore[misc]

    def records_idle(self, used_after: float, never_used: int) -> list[ModelRecord]:
        """Enabled records without copies, as proactive loading wants them: those used after `used_after`
        and the first `never_used` by name of those never used. Records nobody uses are read from their
        JSON without decoding them (a scan of 100,000 takes milliseconds, not seconds)."""
        found = [r for r in self.records_in_use() if not r.copies and r.enabled]
        first: list[str] = []
        for name, held in self._watched.view.items():
            if type(held) is not bytes or _DISABLED in held:
                continue
            used = self._last_used.search(held)
            if used is None:
                if never_used and (len(first) < never_used or name < first[-1]):
                    bisect.insort(first, name)
                    del first[never_used:]
            elif float(used[1]) > used_after:
                found.append(self._view[name])
        return found + [self._view[name] for name in first]

    # --- writes, all compare-and-set on etcd, reflected in the view at once ---

    async def register_if_absent(self, record: ModelRecord) -> bool:
        return self._applied(record.name, record, await self._store.create(self.key(record.name),
                                                                           record.to_json())) is not None

    async def register_all(self, records: Iterable[ModelRecord]) -> int:
        """register_if_absent for many, in transactions of up to BATCH, WRITERS at a time: how many it
        registered. A batch that finds some registered already (by another node) is split until each
        part is all new or one record. `records` is read a batch at a time: made as they are needed, the
        records of 100,000 models are never all in memory at once."""
        pending = iter(records)
        counts: list[int] = []

        async def writer() -> None:
            while batch := list(itertools.islice(pending, BATCH)):
                counts.append(await self._register_batch(batch))

        writers = [asyncio.ensure_future(writer()) for _ in range(WRITERS)]
        try:
            await asyncio.gather(*writers)
        except BaseException:  # etcd failed one (or the caller stopped): the others stop too
            for task in writers:
                task.cancel()
            await asyncio.gather(*writers, return_exceptions=True)
            raise
        return sum(counts)

    async def _register_batch(self, records: Sequence[ModelRecord]) -> int:
        if len(records) == 1:
            return int(await self.register_if_absent(records[0]))
        keys = [self.key(r.name) for r in records]
        values = [r.to_json() for r in records]
        revision = await self._store.commit(dict(zip(keys, values, strict=True)), unchanged=dict.fromkeys(keys, 0))
        if revision is not None:
            for record, raw in zip(records, values, strict=True):
                self._applied_raw(record.name, raw, revision)
            return len(records)
        # Another node registers the same repository: what the watch brought meanwhile is theirs, and the rest
        # goes as one batch again rather than split down to single records (255 transactions for 128 taken).
        rest = [r for r in records if r.name not in self._watched.view]
        if len(rest) < len(records):
            return await self._register_batch(rest) if rest else 0
        half = len(records) // 2
        return await self._register_batch(records[:half]) + await self._register_batch(records[half:])

    async def update(self, name: str, fn: Callable[[ModelRecord | None], ModelRecord | None]) -> ModelRecord | None:
        """Apply fn to the current record (a private copy) until the write wins; None from fn deletes.

        fn must say what the record should become (it can run again, see EtcdStore.update).
        updated_at is stamped on every real change.
        """

        def current(raw: bytes | None) -> ModelRecord | None:
            if raw is not None:
                return ModelRecord.decode(name, raw)
            return self._expected(name) if self._expected is not None else None

        def apply(raw: bytes | None) -> bytes | None:
            old = current(raw)
            new = fn(current(raw))  # a private copy
            if new is None:
                return None
            if new == old:
                return raw
            return dataclasses.replace(new, updated_at=time.time()).to_json()

        raw, revision = await self._store.update_versioned(self.key(name), apply)
        record = ModelRecord.decode(name, raw) if raw is not None else None
        self._applied(name, record, revision)
        return record
