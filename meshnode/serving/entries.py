"""What the cache holds and hands out: a model's entry (loading, then loaded), how to load and keep a
model, and the cache's figures for the instance record and the metrics."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field

from meshnode.runtimes.base import LoadedModel


@dataclass(eq=False, slots=True)
class CachedModel:
    key: str  # "name@version"
    name: str
    version: str
    size_bytes: int  # predicted while loading, measured once loaded
    last_used: float  # wall clock: cache age is shared with other nodes
    loaded_at: float  # wall clock of the load's start, then of its completion
    model: LoadedModel | None = None
    loaded: asyncio.Future[None] | None = None
    inflight: int = 0
    requests: int = 0  # served here since loaded: per-copy load for extra-copy decisions
    # Smoothed seconds one request runs on this copy, measured on requests that did not wait (0: none yet):
    # how long a request that would queue here should expect to wait (meshnode.serving.dataplane).
    run_s: float = 0.0
    pinned: bool = False
    # Wall clock until which a sequence open on this copy keeps it (serving.sequences): its state lives here.
    sequences_until: float = 0.0
    sequence_idle_s: float | None = None  # its config's max_sequence_idle_microseconds in s; 0: none kept; None: unread
    discarded: bool = False
    drained: asyncio.Event | None = None  # set when a discarded entry's last request finishes
    # Local hits on the threaded server's workers (serving.threaded_hits), under the cache's inflight_lock: how
    # many run now (at most runs_per_copy), and one lock per request waiting for a slot, released to hand it one.
    running: int = 0
    turns: deque[threading.Lock] = field(default_factory=deque)
    aliases: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """How one model is loaded and kept, from its registration."""

    predicted_bytes: int
    timeout_s: float | None = None  # None: the node's default
    pinned: bool = False  # never evicted
    churn_guard: bool = False  # refuse to evict recently used models (another node may take it)
    last_used: float | None = None  # orders background loads


@dataclass(frozen=True, slots=True)
class CacheStats:
    capacity_bytes: int
    used_bytes: int
    models_loaded: int
    loads_in_progress: int
    lru_time_s: float | None  # last use of the least recently used loaded model
