"""Unloading this node's copies of a model whose files changed after they loaded.

A re-registration with new files or another storage location, through any node, bumps the model record's
`generation`. Each node remembers the generation its copies of a model were loaded under (read from its view
of the record when the copy starts loading: the record is written after the new files, so a view that shows
the new generation means the new files are there), and unloads them once its view shows a newer one. The next
request for the model then loads the new files, here or wherever placement puts it. Until then, for the
moment the watch takes, the old copy may still answer.

A copy still loading is let finish first: the requests waiting for it asked before the change, and an entry
unloaded under them would answer them NOT_FOUND. A request that joins that load in the moment it has left
can still meet that NOT_FOUND (the cache's answer to a waiter whose load was unloaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from meshnode.background import BackgroundTasks
from meshnode.serving.cache import ModelCache
from meshnode.state.registry import ModelRecord, Registry

log = logging.getLogger(__name__)


class StaleCopies:
    def __init__(self, *, registry: Registry, cache: ModelCache, background: BackgroundTasks) -> None:
        self._registry, self._cache, self._background = registry, cache, background
        self._loaded_under: dict[str, int] = {}  # model -> generation its copies here were loaded under
        cache.add_listener(self._on_copy)
        registry.add_listener(self._on_record)

    def _on_copy(self, name: str) -> None:
        if not self._cache.has_entry(name, ""):
            self._loaded_under.pop(name, None)
        elif name not in self._loaded_under:
            record = self._registry.get(name)
            self._loaded_under[name] = record.generation if record is not None else 0

    def _on_record(self, name: str, record: ModelRecord | None) -> None:
        loaded = self._loaded_under.get(name)
        if record is None or loaded is None or record.generation <= loaded:
            return
        log.info("unloading %s: loaded under generation %d, its files changed (generation %d)",
                 name, loaded, record.generation)
        # Forgotten now, so that record changes until the unload runs do not start it again.
        del self._loaded_under[name]
        self._background.spawn(self._unload(name))

    async def _unload(self, name: str) -> None:
        for entry in list(self._cache.entries(name)):
            if entry.loaded is not None and not entry.loaded.done():
                # Waiting as the requests do (a shield), registered after theirs: resumed after them, once
                # they are counted in flight, which the unload waits for.
                with contextlib.suppress(Exception):  # a failed load is gone from the cache already
                    await asyncio.shield(entry.loaded)
        await self._cache.unload_model(name)
