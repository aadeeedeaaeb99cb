"""Registering, loading, unloading and listing models: Triton's repository extension.

Registrations live in etcd and survive restarts. The repository's models are registered in the background
(meshnode.control.repository_registration); a load by name registers one found in the repository.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace

import grpc

from meshnode.control.alias_switch import RECORDED_WITHIN_S
from meshnode.control.registration import CopyHere, Registration
from meshnode.control.repository_registration import find_model_directory
from meshnode.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    LoadFailed,
    ModelNotFound,
)
from meshnode.mesh.copy_manager import CopyManager
from meshnode.mesh.state import MeshState
from meshnode.serving.cache import ModelCache
from meshnode.serving.replica import LocalReplica
from meshnode.state.aliases import Aliases
from meshnode.state.registry import Copy, Failure, ModelRecord, Registry
from meshnode.storage.locations import Locations
from meshnode.storage.repository import ModelRepository, check_model_name
from placement.types import LOADED, LOADING
from router.errors import MeshError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str  # Triton's: READY, LOADING, UNAVAILABLE, or "" for registered and not loaded
    reason: str


class ModelControl:
    def __init__(
        self, *, registry: Registry, repository: ModelRepository | None, locations: Locations, cache: ModelCache,
        replica: LocalReplica, mesh: MeshState, aliases: Aliases, copies: CopyManager, runtime: str,
    ) -> None:
        self._locations = locations  # where registrations may point, and where uploads go
        self._runtime = runtime  # this node's: models it registers run on nodes like it unless told otherwise
        self._aliases = aliases
        self._registry = registry
        self._repository = repository
        self._cache = cache
        self._replica = replica
        self._mesh = mesh
        self._copies = copies  # where a model goes that this node has no room for

    async def load(self, command: Registration | CopyHere) -> None:
        """RepositoryModelLoad: register (or re-register) and load here, or load a peer's requested copy."""
        if isinstance(command, CopyHere):
            check_model_name(command.name)
            await self.load_copy(command.name)
        else:
            await self.register(command)

    async def register(self, registration: Registration) -> None:
        name = registration.name
        check_model_name(name)
        if name in self._aliases.targets:
            raise AlreadyExists(f"'{name}' is an alias; a model needs a name of its own")
        existing = self._registry.get(name)
        files = registration.files
        if files:
            storage = await self._locations.upload(name, files)
        elif registration.storage_uri is not None:
            storage = await self._locations.resolve(registration.storage_uri)
        elif existing is not None:
            storage = existing.storage
        elif self._repository is not None and (found := find_model_directory(self._repository.root, name)):
            storage = str(found)
        else:
            raise ModelNotFound(
                f"failed to load '{name}': not in the model repository and no storage_uri or files given")
        hint, keeping = registration.size_hint_bytes, registration.keeping()

        def replaces(old: ModelRecord | None) -> bool:
            """New files, a new location or another config override: every copy loaded from the old ones is
            stale."""
            return old is not None and (bool(files) or old.storage != storage or registration.config_override
                                        not in (None, old.config_override))

        def register(old: ModelRecord | None) -> ModelRecord:
            if old is None:
                return ModelRecord(name=name, storage=storage, size_hint=hint,
                                   **({"runtime": self._runtime} | keeping))
            # A reload forgets failures; new files also make every copy in the mesh stale: the new generation
            # has every node unload its copy (meshnode.control.stale_copies), and the record forgets them.
            stale = replaces(old)
            origin = old.origin if storage == old.storage else ""  # moved through the API: it stays registered
            return replace(old, storage=storage, origin=origin, enabled=True, size_hint=hint, failures={},
                           copies={} if stale else old.copies, size_bytes=None if stale else old.size_bytes,
                           generation=old.generation + 1 if stale else old.generation, **keeping)

        # Triton's load is a reload: new files or a new location replace what is loaded here.
        if replaces(existing):
            await self._cache.unload_model(name)
        self._cache.failures.clear(name)
        await self._registry.update(name, register)
        record = self._registry.get(name)
        if registration.lazy or (record is not None and not record.runs_on(self._runtime)):
            return  # another runtime's model: the first request loads it on a node that runs it
        try:
            entry = await self._replica.acquire(name, "")
        except MeshError as error:
            if error.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise LoadFailed.because(f"load failed for model '{name}': {error}", error) from error
            await self._load_elsewhere(name, error)  # no room here: loaded, as a client of the mesh sees it
            return
        self._cache.release(entry)

    async def _load_elsewhere(self, name: str, here: MeshError) -> None:
        """The model served by a copy on another node: one there already, else one placement puts there."""
        if self._loaded_somewhere(self._registry.get(name)):
            return
        loaded, why = await self._copies.add_copies(name, 1)
        if not loaded:
            elsewhere = "; ".join(str(e) for e in why) or "no other node took it"
            raise LoadFailed.because(f"load failed for model '{name}': {here}; elsewhere: {elsewhere}", here)
        # The copy's node records it a flush later: until then this node's next call for the model (its config,
        # metadata) would not know of it.
        with contextlib.suppress(DeadlineExceeded):
            await self._registry.wait_for(name, self._loaded_somewhere, RECORDED_WITHIN_S)

    def _loaded_somewhere(self, record: ModelRecord | None) -> bool:
        return record is not None and any(c["state"] == LOADED for c in self.copies(record).values())

    async def load_copy(self, name: str) -> None:
        """A copy here of a registered model (drain hand-off, extra copies); its record is unchanged."""
        try:
            entry = await self._replica.acquire(name, "")
        except MeshError as error:
            raise LoadFailed.because(f"no copy of model '{name}' on this node: {error}", error) from error
        self._cache.release(entry)

    async def unload(self, name: str, unregister: bool = False) -> None:
        """RepositoryModelUnload: stop serving the model here and in the mesh; with `unregister`, forget it.

        Refused while an alias points (or is switching) at it: the alias would send its requests to a model
        that is gone. Alias retirement unregisters through here too, and only models no alias points at."""
        if self._registry.get(name) is None:
            raise ModelNotFound(f"failed to unload '{name}': model is not registered")
        if pointing := self._aliases.pointing_at(name):
            aliases = ", ".join(f"'{a}'" for a in pointing)
            plural = "es" if len(pointing) > 1 else ""
            raise FailedPrecondition(f"cannot {'unregister' if unregister else 'unload'} model '{name}': alias{plural} "
                                     f"{aliases} point{'' if plural else 's'} at it; move or delete alias{plural} "
                                     f"{aliases} first")
        if unregister:
            await self._registry.delete(name)
        else:
            await self._registry.update(name, lambda r: replace(r, enabled=False) if r is not None else None)
        await self._cache.unload_model(name)

    def index(self, ready_only: bool) -> list[IndexEntry]:
        """Every registered model with its state in the mesh: where its copies are, or why none."""
        entries = (self.entry(record) for record in sorted(self._registry.records(), key=lambda r: r.name))
        return [e for e in entries if not ready_only or e.state == "READY"]

    def copies(self, record: ModelRecord) -> dict[str, Copy]:
        """The model's copies on live nodes. Other nodes' as their records say; this node's from its
        own cache, which is ahead of its record (a claim that failed to load is gone here first)."""
        me = self._mesh.instance_id
        copies = record.live_copies(self._mesh.nodes())
        copies.pop(me, None)
        for e in self._cache.entries(record.name):
            mine = record.copies.get(me)
            copies[me] = Copy(state=LOADED if e.model else LOADING, since=mine["since"] if mine else time.time())
        return copies

    def failures(self, record: ModelRecord) -> dict[str, Failure]:
        """The model's recent load failures by node; this node's from its own cache, ahead of its record."""
        failures = dict(record.failures)
        mine = self._cache.failures.newest(record.name)
        if mine is not None:
            failures[self._mesh.instance_id] = mine
        return failures

    def entry(self, record: ModelRecord, copies: dict[str, Copy] | None = None) -> IndexEntry:
        """The model's state for RepositoryIndex; `copies`, when the caller has them already."""
        copies = self.copies(record) if copies is None else copies
        if record.enabled and copies:
            state = "READY" if any(c["state"] == LOADED for c in copies.values()) else "LOADING"
            version = next((e.version for e in self._cache.entries(record.name)), "")
            where = ", ".join(f"{n} ({c['state']})" for n, c in sorted(copies.items()))
            return IndexEntry(record.name, version, state, f"copies: {where}")
        return self._idle_entry(record)

    def _idle_entry(self, record: ModelRecord) -> IndexEntry:
        if not record.enabled:
            return IndexEntry(record.name, "", "UNAVAILABLE", "unloaded")
        local_failure = self._cache.failures.newest(record.name)
        if local_failure is not None:
            return IndexEntry(record.name, "", "UNAVAILABLE", f"load failed: {local_failure['message']}")
        if record.failures:
            node, failure = max(record.failures.items(), key=lambda f: f[1]["at"])
            return IndexEntry(record.name, "", "UNAVAILABLE", f"load failed on {node}: {failure['message']}")
        return IndexEntry(record.name, "", "", "registered; loads on first request")
