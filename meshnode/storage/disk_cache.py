"""The disk tier: models pulled from a store, kept on local disk, evicted by least recent use.

DIR/<key>/ holds one model: manifest.json (the URI, the store's version of it, the model's path, its bytes)
and the files. An entry is built in DIR/.tmp-<key>-*/ and renamed into place whole, manifest included, so
a directory without a manifest is never an entry: a crash mid-download leaves only a .tmp-* directory,
removed at the next start. Recency is the manifest's mtime, so a restarted node keeps its order.

Thread-safe: entries are built in worker threads; one lock guards the index, the pins and eviction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_TEMP_PREFIXES = (".tmp-", ".trash-")


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    uri: str  # as shown: no credentials
    model: Path  # what a load reads: a model directory or a single model file
    version: Mapping[str, Any]  # what the store said of the model when it was pulled (sizes, ETags)
    bytes: int


class DiskCache:
    def __init__(self, directory: Path, max_bytes: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """`max_bytes` None keeps everything; a model bigger than the budget is still kept while in use."""
        self.directory = directory
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}  # least recently used first
        self._pins: dict[str, int] = {}
        self.evictions = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._scan()

    def _scan(self) -> None:
        found: list[tuple[float, Entry]] = []
        for child in self.directory.iterdir():
            if child.name.startswith(_TEMP_PREFIXES):
                shutil.rmtree(child, ignore_errors=True)
                continue
            entry = self._read_entry(child)
            if entry is None:
                log.warning("disk cache: removing %s, not a complete entry", child)
                _remove(child)
            else:
                found.append(((child / MANIFEST).stat().st_mtime, entry))
        for _, entry in sorted(found, key=lambda pair: pair[0]):
            self._entries[entry.key] = entry

    def _read_entry(self, root: Path) -> Entry | None:
        try:
            data = json.loads((root / MANIFEST).read_text())
            model = root / data["model"]
            if not model.exists() or not model.resolve().is_relative_to(root.resolve()):
                return None
            return Entry(root.name, str(data["uri"]), model, data["version"], int(data["bytes"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> Entry | None:
        with self._lock:
            return self._entries.get(key)

    def touch(self, key: str) -> None:
        """Marks an entry used now (most recent), on disk too."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return
            self._entries[key] = entry
        now = self._clock()
        # Removed meanwhile (evicted by another pull): nothing to mark.
        with contextlib.suppress(OSError):
            os.utime(self.directory / key / MANIFEST, (now, now))

    def pin(self, key: str) -> None:
        """While pinned (a load reading it), an entry is never evicted."""
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        with self._lock:
            count = self._pins.pop(key, 0) - 1
            if count > 0:
                self._pins[key] = count

    def staging(self, key: str) -> Path:
        """A fresh directory to build an entry in; commit() moves it into place, discard() removes it."""
        return Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.directory))

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, key: str, staging: Path, model: Path, uri: str, version: Mapping[str, Any]) -> Entry:
        """Makes the verified files in `staging` the entry for `key`, replacing an older one whole."""
        size = _tree_bytes(staging)
        relative = model.relative_to(staging).as_posix()
        manifest = {"uri": uri, "model": relative, "version": version, "bytes": size}
        (staging / MANIFEST).write_text(json.dumps(manifest))
        final = self.directory / key
        with self._lock:
            if final.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".trash-{key}-", dir=self.directory))
                os.replace(final, trash / key)
            else:
                trash = None
            os.replace(staging, final)
            entry = Entry(key, uri, final / relative, dict(version), size)
            self._entries.pop(key, None)
            self._entries[key] = entry
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        self.touch(key)
        return entry

    def remove(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)
        _remove(self.directory / key)

    def evict(self) -> list[str]:
        """Removes least recently used entries, pinned ones never, until the cache fits its budget; returns
        the URIs evicted."""
        if self.max_bytes is None:
            return []
        victims: list[Entry] = []
        with self._lock:
            used = sum(e.bytes for e in self._entries.values())
            for entry in list(self._entries.values()):
                if used <= self.max_bytes:
                    break
                if self._pins.get(entry.key):
                    continue
                del self._entries[entry.key]
                used -= entry.bytes
                victims.append(entry)
            self.evictions += len(victims)
        for entry in victims:
            _remove(self.directory / entry.key)
        return [entry.uri for entry in victims]


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
