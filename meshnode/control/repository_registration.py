"""The local model repository registered for the mesh, in the background: a node serves before it is done.

A brand-new repository of 100,000 models takes seconds to register (a directory scan and hundreds of batched
transactions); a node that did it before serving was ready in 15-19 s. So the node serves as soon as its view is
built and this part registers what the registry lacks meanwhile. Until it is done, the registry answers a name
it lacks with the model directory of that name, if there is one (`Registry.expect`): a request for such a model
is served at once, and its load claim is the write that registers it.

The scan reads the repository with os.scandir (a directory entry says whether it is a directory without a stat)
and looks into only the directories the registry lacks: when every name is registered already (a restart, a
node joining), it is one read of the top directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Container
from pathlib import Path

from meshnode.background import BackgroundTasks
from meshnode.etcd.store import EtcdError
from meshnode.state.registry import BATCH, WRITERS, ModelRecord, Registry
from meshnode.storage.repository import ModelRepository

log = logging.getLogger(__name__)

RETRY_S = 5.0  # etcd was unreachable: the registration tries again after this
# What the node waits for before it serves (a new repository of a few models is registered in milliseconds).
HEAD_START_S = 0.5
REGISTERED = "repository registered"  # in the log line of a registration done (benches wait for it)


def is_model_directory(path: str) -> bool:
    """A directory holding a numeric version directory (Triton's layout NAME/VERSION/...)."""
    try:
        with os.scandir(path) as entries:
            return any(e.name.isdigit() and e.is_dir() for e in entries)
    except OSError:  # not a directory, gone, a name too long
        return False


def find_model_directory(root: Path, name: str) -> Path | None:
    """The repository's model directory named `name`, or None; reads that one directory only."""
    if not name or name.startswith(".") or "/" in name or "\x00" in name:
        return None  # hidden, or outside the repository
    path = root / name
    return path if is_model_directory(str(path)) else None


def new_directories(root: Path, known: Container[str]) -> list[str]:
    """The names of the repository's directories not in `known` (model directories or not), sorted."""
    try:
        with os.scandir(root) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(".") and e.name not in known and e.is_dir())
    except OSError:  # no repository (yet): nothing to register
        return []


def model_directories(root: Path, names: list[str]) -> list[str]:
    """Those of `names` that are model directories of the repository."""
    return [name for name in names if is_model_directory(os.path.join(root, name))]


class RepositoryRegistration:
    """Registers the repository's new model directories (lazily: nothing loads until asked) in a task of the
    node's background tasks, which the node cancels when it stops. Never re-enables a model an unload disabled:
    a registered name is left as it is."""

    def __init__(self, *, repository: ModelRepository | None, registry: Registry, runtime: str,
                 background: BackgroundTasks, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, retry_s: float = RETRY_S) -> None:
        self._repository = repository  # None: a store's repository, which meshnode.control.repository_sync follows
        self._registry = registry
        self._runtime = runtime  # this node's: the models run on nodes like it unless told otherwise
        self._background = background
        self._now = clock
        self._retry_s = retry_s
        self._rng = rng or random.Random()
        self._registering_at = 0.0
        self._task: asyncio.Future[int] | None = None

    def start(self) -> None:
        if self._repository is None:
            return
        self._registering_at = self._now()
        self._registry.expect(self.found)
        self._task = self._background.spawn(self._run(self._repository.root))

    async def head_start(self, within_s: float = HEAD_START_S) -> None:
        """Waits up to `within_s` for the registration: a small repository is registered before the node serves
        (a listing right after it is ready shows it whole, as before), a big one goes on in the background."""
        if self._task is not None:
            await asyncio.wait([self._task], timeout=within_s)

    async def wait(self) -> int:
        """Until the registration is done: how many models it registered."""
        return await self._task if self._task is not None else 0

    def found(self, name: str) -> ModelRecord | None:
        """The record the registration gives the repository's model directory `name`, or None."""
        assert self._repository is not None
        directory = find_model_directory(self._repository.root, name)
        return self._record(name, str(directory)) if directory is not None else None

    def _record(self, name: str, storage: str) -> ModelRecord:
        at = self._registering_at
        return ModelRecord(name=name, storage=storage, registered_at=at, updated_at=at, runtime=self._runtime)

    async def _run(self, root: Path) -> int:
        try:
            while True:
                try:
                    return await self._register(root)
                except EtcdError as error:
                    log.warning("model repository %s not registered yet (trying again in %.0f s): %s",
                                root, self._retry_s, error)
                except Exception:  # a task of the node's background tasks: nobody else would tell
                    log.exception("model repository %s not registered yet (trying again in %.0f s)", root,
                                  self._retry_s)
                await asyncio.sleep(self._retry_s)
        finally:
            self._registry.expect(None)

    async def _register(self, root: Path) -> int:
        started = time.monotonic()
        view = self._registry.view
        # Off the loop: the names only (a directory entry says whether it is a directory without a stat).
        names = await asyncio.to_thread(new_directories, root, view)
        # Nodes started together register the same new repository: in an order of their own, each mostly takes
        # parts the others have not reached (a batch they collide on costs a transaction more, see
        # Registry.register_all), and skips what the others wrote before it got there: it reads only the
        # directories of models it registers itself (100,000 read by each of three nodes took seconds of CPU).
        parts = [names[i:i + BATCH] for i in range(0, len(names), BATCH)]
        self._rng.shuffle(parts)
        added = 0
        for at in range(0, len(parts), WRITERS):
            unregistered = [n for part in parts[at:at + WRITERS] for n in part if n not in view]
            found = await asyncio.to_thread(model_directories, root, unregistered)
            # Records made as the batches take them; a name registered meanwhile (a load claim) stays as it is.
            added += await self._registry.register_all(self._record(n, os.path.join(root, n)) for n in found
                                                       if n not in view)
        log.info("%s: %s: %d new models in %.1f s (%d directories)", root, REGISTERED, added,
                 time.monotonic() - started, len(names))
        return added
