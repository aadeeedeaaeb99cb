"""What the mesh is measured against, on the same trace and latency model.

Baselines load instantly (a request waits for its own load, never for another's) and never refuse;
a model larger than the cache it would go into is rejected, as in the mesh.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict
from collections.abc import Callable

from placement.simstats import LatencyModel, Result
from placement.workloads import Trace

_Access = Callable[[int, int], tuple[bool, int] | None]  # (request index, model) -> (hit, evictions) or rejected


def run_lru(trace: Trace, capacity_bytes: int, latency: LatencyModel) -> Result:
    """One ideal LRU cache of the whole mesh's capacity: no fragmentation, no staleness, no loads in flight."""
    cache = _Lru(capacity_bytes, trace.sizes)
    return _run("global_lru", trace, latency, lambda i, m: cache.access(m))


def run_random(trace: Trace, nodes: int, capacity_bytes: int, latency: LatencyModel, seed: int = 0) -> Result:
    """Each miss loads on a uniformly random node, which evicts by its own LRU: placement without a policy."""
    rng = random.Random(seed)
    caches = [_Lru(capacity_bytes, trace.sizes) for _ in range(nodes)]
    where: dict[int, _Lru] = {}  # model -> the node holding it (random placement makes one copy)

    def access(i: int, m: int) -> tuple[bool, int] | None:
        cache = where.get(m)
        if cache is not None and m in cache.lru:
            return cache.access(m)
        cache = rng.choice(caches)
        where[m] = cache
        return cache.access(m)

    return _run("random", trace, latency, access)


def run_belady(trace: Trace, capacity_bytes: int, latency: LatencyModel) -> Result:
    """Belady's offline rule on one cache of the whole capacity: evict the model used again farthest ahead.

    Optimal for equal sizes; with sizes it is a heuristic (the optimum is NP-hard), usually near it and
    well above LRU. Every requested model is admitted, since serving it needs it loaded.
    """
    n = len(trace)
    next_use = [n] * n  # request index of the same model's next use; n: never again
    seen: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        m = trace.models[i]
        next_use[i] = seen.get(m, n)
        seen[m] = i
    sizes = trace.sizes
    resident: dict[int, int] = {}  # model -> its next use
    farthest: list[tuple[int, int]] = []  # (-next use, model); stale entries skipped when popped
    used = 0

    def access(i: int, m: int) -> tuple[bool, int] | None:
        nonlocal used
        hit = m in resident
        if not hit:
            if sizes[m] > capacity_bytes:
                return None
            evicted = 0
            while used + sizes[m] > capacity_bytes:
                neg, victim = heapq.heappop(farthest)
                if resident.get(victim) == -neg:
                    del resident[victim]
                    used -= sizes[victim]
                    evicted += 1
            used += sizes[m]
        resident[m] = next_use[i]
        heapq.heappush(farthest, (-next_use[i], m))
        return (True, 0) if hit else (False, evicted)

    return _run("belady", trace, latency, access)


class _Lru:
    __slots__ = ("capacity", "sizes", "lru", "used")

    def __init__(self, capacity_bytes: int, sizes: list[int]) -> None:
        self.capacity = capacity_bytes
        self.sizes = sizes
        self.lru: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.used = 0

    def access(self, m: int) -> tuple[bool, int] | None:
        if m in self.lru:
            self.lru.move_to_end(m)
            return True, 0
        size = self.sizes[m]
        if size > self.capacity:
            return None
        evicted = 0
        while self.used + size > self.capacity:
            victim, _ = self.lru.popitem(last=False)
            self.used -= self.sizes[victim]
            evicted += 1
        self.lru[m] = None
        self.used += size
        return False, evicted


def _run(name: str, trace: Trace, latency: LatencyModel, access: _Access) -> Result:
    result = Result(name)
    sizes = trace.sizes
    for i, m in enumerate(trace.models):
        result.requests += 1
        outcome = access(i, m)
        if outcome is None:
            result.rejected += 1
            continue
        hit, evicted = outcome
        result.evictions += evicted
        if hit:
            result.hits += 1
            result.record(latency.hit_s)
        else:
            result.loads += 1
            result.load_bytes += sizes[m]
            result.record(latency.hit_s + latency.load_s(sizes[m]))
    return result
