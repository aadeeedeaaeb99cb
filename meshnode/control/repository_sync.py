"""A remote model repository (`--model-repository s3://bucket/models`) followed by the registry.

Once for the mesh, not once per node: only the live node with the lowest instance id lists the store, every
`--repository-poll-interval` seconds. A model that appears is registered (lazily: it loads on first request);
a model that came from the listing and is gone from the store is unregistered; a model registered through the
API stays until unregistered, even under a name the store also lists. A listing that fails changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from meshnode.background import cancel_and_wait
from meshnode.etcd.store import EtcdError
from meshnode.state.registry import ModelRecord, Registry
from router.errors import MeshError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SyncResult:
    added: tuple[str, ...]
    removed: tuple[str, ...]


class RepositorySync:
    def __init__(self, *, repository_uri: str, list_models: Callable[[], Awaitable[Mapping[str, str]]],
                 registry: Registry, unregister: Callable[[str], Awaitable[None]], polls_here: Callable[[], bool],
                 runtime: str, interval_s: float, clock: Callable[[], float] = time.time) -> None:
        self._uri = repository_uri
        self._list_models = list_models
        self._registry = registry
        self._unregister = unregister
        self._polls_here = polls_here  # this node is the one that lists the store for the mesh
        self._runtime = runtime
        self._interval_s = interval_s
        self._now = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll_forever(), name="repository-sync")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def _poll_forever(self) -> None:
        while True:
            if self._polls_here():
                try:
                    await self.sync()
                except (MeshError, EtcdError) as error:  # the store or etcd is down: the next round tries again
                    log.warning("model repository %s not synced: %s", self._uri, error)
            await asyncio.sleep(self._interval_s)

    async def sync(self) -> SyncResult:
        """One round: register what the store lists and the registry lacks, unregister what it no longer lists."""
        listed = await self._list_models()
        added: list[str] = []
        for name, storage in sorted(listed.items()):
            if self._registry.get(name) is None:
                now = self._now()
                record = ModelRecord(name=name, storage=storage, registered_at=now, updated_at=now,
                                     runtime=self._runtime, origin=self._uri)
                if await self._registry.register_if_absent(record):
                    added.append(name)
        removed: list[str] = []
        for record in self._registry.records():
            if record.origin == self._uri and record.name not in listed:
                try:
                    await self._unregister(record.name)
                except MeshError as error:  # an alias still points at it: it stays until the alias moves
                    log.warning("model %s is gone from %s but stays registered: %s", record.name, self._uri, error)
                    continue
                removed.append(record.name)
        if added or removed:
            log.info("model repository %s: %d registered, %d unregistered", self._uri, len(added), len(removed))
        return SyncResult(tuple(added), tuple(removed))
