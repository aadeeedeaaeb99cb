"""Registering, loading, unloading and listing models: Triton's repository extension.

Registrations live in etcd and survive restarts; the startup scan registers what it finds in
the model repository lazily (nothing loads until asked), and never re-enables a model that a
RepositoryModelUnload disabled.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from meshnode.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidInput,
    LoadFailed,
    MeshError,
    ModelNotFound,
)
from meshnode.mesh.state import MeshState
from meshnode.runtimes import RUNTIMES
from meshnode.serving.cache import ModelCache
from meshnode.serving.dataplane import DataPlane
from meshnode.state.aliases import Aliases
from meshnode.state.registry import Copy, ModelRecord, Registry
from meshnode.storage.repository import ModelRepository, check_model_name, resolve_storage_uri
from placement.types import LOADED, LOADING

log = logging.getLogger(__name__)

# Repository parameters beyond Triton's `config` and `file:*`; Triton ignores unknown ones too.
PARAM_LAZY = "meshserve.lazy"  # register without loading now
PARAM_UNREGISTER = "meshserve.unregister"  # with unload: forget the model entirely
PARAM_SIZE_HINT = "meshserve.size_hint"
PARAM_COPY = "meshserve.copy"  # from a peer: load a copy of a registered model here, nothing else


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str  # Triton's: READY, LOADING, UNAVAILABLE, or "" for registered and not loaded
    reason: str


class ModelControl:
    def __init__(
        self, *, registry: Registry, repository: ModelRepository, cache: ModelCache, dataplane: DataPlane,
        mesh: MeshState, aliases: Aliases, runtime: str,
    ) -> None:
        self._runtime = runtime  # this node's: models it registers run on nodes like it unless told otherwise
        self._aliases = aliases
        self._registry = registry
        self._repository = repository
        self._cache = cache
        self._dataplane = dataplane
        self._mesh = mesh

    async def register_repository(self) -> int:
        """Register every model directory of the repository not registered yet; returns how many."""
        added = 0
        for name, directory in self._repository.scan().items():
            now = time.time()
            record = ModelRecord(name=name, storage=str(directory), registered_at=now, updated_at=now,
                                 runtime=self._runtime)
            if await self._registry.register_if_absent(record):
                added += 1
        return added

    async def load(self, name: str, params: dict[str, object]) -> None:
        check_model_name(name)
        if params.get(PARAM_COPY) is True:
            await self.load_copy(name)
            return
        if name in self._aliases.targets:
            raise AlreadyExists(f"'{name}' is an alias; a model needs a name of its own")
        files = {k[len("file:"):]: v for k, v in params.items() if k.startswith("file:")}
        config = _parse_config(params.get("config"))
        size_hint = params.get(PARAM_SIZE_HINT, config.get("size_hint"))
        existing = self._registry.get(name)
        if files:
            if not all(isinstance(v, bytes) for v in files.values()):
                raise InvalidInput("file: parameters must carry bytes")
            storage = self._repository.store_files(name, files)  # type: ignore[arg-type]
        elif isinstance(config.get("storage_uri"), str):
            storage = resolve_storage_uri(config["storage_uri"])
        elif existing is not None:
            storage = Path(existing.storage)
        elif (found := self._repository.scan().get(name)) is not None:
            storage = found
        else:
            raise ModelNotFound(
                f"failed to load '{name}': not in the model repository and no storage_uri or files given")
        hint = int(size_hint) if isinstance(size_hint, int | str) and str(size_hint).isdigit() else None
        keeping = _keeping(config)
        replaced = existing is not None and (bool(files) or existing.storage != str(storage))

        def register(old: ModelRecord | None) -> ModelRecord:
            if old is None:
                return ModelRecord(name=name, storage=str(storage), size_hint=hint,
                                   **({"runtime": self._runtime} | keeping))
            # A reload forgets failures; new files also make every copy in the mesh stale.
            return replace(old, storage=str(storage), enabled=True, size_hint=hint, failures={},
                           copies={} if replaced else old.copies, size_bytes=None if replaced else old.size_bytes,
                           **keeping)

        # Triton's load is a reload: new files or a new location replace what is loaded here.
        if replaced:
            await self._cache.unload_model(name)
        self._cache.failures.clear(name)
        await self._registry.update(name, register)
        record = self._registry.get(name)
        if params.get(PARAM_LAZY) is True or (record is not None and not record.runs_on(self._runtime)):
            return  # another runtime's model: the first request loads it on a node that runs it
        try:
            entry = await self._dataplane.acquire(name, "")
        except MeshError as error:
            raise LoadFailed(f"load failed for model '{name}': {error}") from error
        self._cache.release(entry)

    async def load_copy(self, name: str) -> None:
        """A copy here of a registered model (drain hand-off, extra copies); its record is unchanged."""
        try:
            entry = await self._dataplane.acquire(name, "")
        except MeshError as error:
            raise LoadFailed(f"no copy of model '{name}' on this node: {error}") from error
        self._cache.release(entry)

    async def unload(self, name: str, params: dict[str, object]) -> None:
        if self._registry.get(name) is None:
            raise ModelNotFound(f"failed to unload '{name}': model is not registered")
        if params.get(PARAM_UNREGISTER) is True:
            if pointing := self._aliases.pointing_at(name):
                raise FailedPrecondition(f"model '{name}' is the target of alias {', '.join(pointing)}: "
                                         "point the alias elsewhere or delete it first")
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
        live, me = self._mesh.nodes(), self._mesh.instance_id
        copies = {n: c for n, c in record.copies.items() if n in live and n != me}
        for e in self._cache.entries(record.name):
            mine = record.copies.get(me)
            copies[me] = Copy(state=LOADED if e.model else LOADING, since=mine["since"] if mine else time.time())
        return copies

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


def _keeping(config: dict[str, object]) -> dict[str, Any]:
    """How and where the mesh keeps the model, from the load's config JSON: pinned, min_copies,
    load_timeout_s, runtime."""
    keeping: dict[str, Any] = {}
    runtime = config.get("runtime")
    if runtime is not None:
        if runtime != "" and runtime not in RUNTIMES:
            raise InvalidInput(f"config 'runtime' must be one of {', '.join(RUNTIMES)}, or \"\" for any")
        keeping["runtime"] = runtime
    pinned, min_copies, timeout = config.get("pinned"), config.get("min_copies"), config.get("load_timeout_s")
    if pinned is not None:
        if not isinstance(pinned, bool):
            raise InvalidInput("config 'pinned' must be true or false")
        keeping["pinned"] = pinned
    if min_copies is not None:
        if not isinstance(min_copies, int) or isinstance(min_copies, bool) or not 1 <= min_copies <= 100:
            raise InvalidInput("config 'min_copies' must be a whole number from 1 to 100")
        keeping["min_copies"] = min_copies
    if timeout is not None:
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidInput("config 'load_timeout_s' must be a positive number of seconds")
        keeping["load_timeout_s"] = float(timeout)
    return keeping


def _parse_config(raw: object) -> dict[str, object]:
    if raw is None:
        return {}
    if not isinstance(raw, str):
        raise InvalidInput("the 'config' parameter must be a JSON string")
    try:
        config = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as error:
        raise InvalidInput(f"the 'config' parameter is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise InvalidInput("the 'config' parameter must be a JSON object")
    return config
