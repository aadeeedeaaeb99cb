"""The model registry: one JSON record per model under `models/<name>` in etcd, and a local view of it.

The view is a dict kept current by a watch, so the request path looks a model up without waiting
on etcd. Writes go through compare-and-set and are applied to the view at once; each name keeps
the revision it was last set at, so an older watch event arriving afterwards cannot undo them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

from meshnode.errors import DeadlineExceeded
from meshnode.etcdstore import EtcdStore, EtcdUnavailable, WatchEvent, WatchResync

log = logging.getLogger(__name__)

PREFIX = "models/"

Listener = Callable[[str, "ModelRecord | None"], None]


class Failure(TypedDict):
    at: float
    node: str
    message: str


@dataclass
class ModelRecord:
    name: str
    storage: str  # absolute path: a Triton-layout model directory, or a single model file
    enabled: bool = True  # False after RepositoryModelUnload: not served until loaded again
    size_hint: int | None = None
    registered_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    failure: Failure | None = None
    # Fields written by newer versions, kept as read so a read-modify-write here does not drop them.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return json.dumps({**self.extra, **data}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> ModelRecord:
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ValueError("model record must be a JSON object with a string 'name'")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        record = cls(**{k: v for k, v in data.items() if k in known})
        record.extra = {k: v for k, v in data.items() if k not in known}
        return record


def _key(name: str) -> str:
    return PREFIX + name


def _decode(name: str, raw: bytes) -> ModelRecord | None:
    try:
        return ModelRecord.from_json(raw)
    except (ValueError, TypeError) as e:
        log.warning("ignoring malformed registry record %r: %s", name, e)
        return None


class Registry:
    def __init__(self, store: EtcdStore) -> None:
        self._store = store
        self._view: dict[str, ModelRecord] = {}
        # Revision each name was last set or deleted at; deletions stay until the watch passes them.
        self._revisions: dict[str, int] = {}
        self._listeners: list[Listener] = []
        self._changed = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None

    # --- local view: no etcd on these paths ---

    def get(self, name: str) -> ModelRecord | None:
        return self._view.get(name)

    def names(self) -> list[str]:
        return list(self._view)

    def records(self) -> list[ModelRecord]:
        return list(self._view.values())

    def add_listener(self, callback: Listener) -> None:
        """callback(name, record or None when removed) after each change to the view."""
        self._listeners.append(callback)

    async def wait_for(
        self,
        name: str,
        predicate: Callable[[ModelRecord | None], bool],
        timeout: float,  # noqa: ASYNC109 - tests and the CLI want one bounded call
    ) -> ModelRecord | None:
        """Wait until predicate(view's record) holds; DeadlineExceeded after timeout seconds."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(record := self._view.get(name)):
                    await self._changed.wait()
                return record
        except TimeoutError:
            raise DeadlineExceeded(
                f"registry record {name!r} did not reach the expected state within {timeout:g} s"
            ) from None

    # --- lifecycle ---

    async def start(self) -> None:
        """Load every record, then follow changes from the next revision on."""
        revision = await self._resync()
        self._watch = asyncio.create_task(self._follow(revision), name="registry-watch")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    # --- writes, all compare-and-set on etcd, reflected in the view at once ---

    async def register_if_absent(self, record: ModelRecord) -> bool:
        revision = await self._store.create(_key(record.name), record.to_json())
        if revision is None:
            return False
        self._apply(record.name, record, revision)
        return True

    async def put(self, record: ModelRecord) -> None:
        """Create or replace; fields this version does not know are kept from the stored record."""

        def replace(old: ModelRecord | None) -> ModelRecord:
            if old is None:
                return record
            return dataclasses.replace(record, extra={**old.extra, **record.extra})

        await self.update(record.name, replace)

    async def update(
        self, name: str, fn: Callable[[ModelRecord | None], ModelRecord | None]
    ) -> ModelRecord | None:
        """Apply fn to the current record (a private copy) until the write wins; None from fn deletes.

        fn must say what the record should become (it can run again, see EtcdStore.update).
        updated_at is stamped on every real change.
        """

        def apply(raw: bytes | None) -> bytes | None:
            old = _decode(name, raw) if raw is not None else None
            new = fn(_decode(name, raw) if raw is not None else None)
            if new is None:
                return None
            if new == old:
                return raw
            return dataclasses.replace(new, updated_at=time.time()).to_json()

        raw, revision = await self._store.update_versioned(_key(name), apply)
        record = _decode(name, raw) if raw is not None else None
        self._apply(name, record, revision)
        return record

    async def unregister(self, name: str) -> bool:
        revision = await self._store.delete(_key(name))
        if revision is None:
            return False
        self._apply(name, None, revision)
        return True

    async def get_remote(self, name: str) -> ModelRecord | None:
        """Read etcd itself (linearizable), refreshing the view with what it says."""
        found = await self._store.get(_key(name))
        if found is None:
            return None
        record = _decode(name, found[0])
        self._apply(name, record, found[1])
        return record

    # --- view maintenance ---

    def _apply(self, name: str, record: ModelRecord | None, revision: int) -> None:
        if revision <= self._revisions.get(name, 0):
            return  # the view already holds this change or a newer one
        self._revisions[name] = revision
        if record is None:
            if self._view.pop(name, None) is None:
                return
        else:
            self._view[name] = record
        self._notify(name, record)

    def _notify(self, name: str, record: ModelRecord | None) -> None:
        for callback in self._listeners:
            try:
                callback(name, record)
            except Exception:
                log.exception("registry listener failed for %r", name)
        # Wake every waiter; the next change gets a fresh event to wait on.
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_event(self, ev: WatchEvent) -> None:
        name = ev.key[len(PREFIX) :]
        if ev.type == "put":
            self._apply(name, _decode(name, ev.value), ev.mod_revision)
        else:
            self._apply(name, None, ev.mod_revision)
            if name not in self._view and self._revisions.get(name, 0) <= ev.mod_revision:
                # The watch is past this deletion, so no older event for the name can follow.
                del self._revisions[name]

    async def _resync(self) -> int:
        """Make the view exactly etcd's listing at revision R and return R.

        Replaced outright, not merged by revision: after etcd lost its data, revisions start
        over and would compare wrongly. A local write newer than R may vanish from the view for
        a moment; the watch from R + 1 brings it back.
        """
        entries, revision = await self._store.snapshot_prefix(PREFIX)
        listed = {e.key[len(PREFIX) :]: e for e in entries}
        self._revisions = {}
        for name in [n for n in self._view if n not in listed]:
            del self._view[name]
            self._notify(name, None)
        for name, e in listed.items():
            self._revisions[name] = e.mod_revision
            record = _decode(name, e.value)
            if record is None:
                if self._view.pop(name, None) is not None:
                    self._notify(name, None)
            elif self._view.get(name) != record:
                self._view[name] = record
                self._notify(name, record)
        return revision

    async def _follow(self, revision: int) -> None:
        while True:
            try:
                async for ev in self._store.watch_prefix(PREFIX, revision + 1):
                    self._on_event(ev)
            except WatchResync as e:
                log.warning("registry view out of step with etcd (%s); listing again", e)
            except Exception:
                # A dead watch would freeze the view for good: log, list again, watch again.
                log.exception("registry watch failed; listing again")
            revision = await self._resync_when_possible()

    async def _resync_when_possible(self) -> int:
        while True:
            try:
                return await self._resync()
            except EtcdUnavailable as e:
                log.warning("registry resync waits for etcd: %s", e)
                await asyncio.sleep(1.0)
