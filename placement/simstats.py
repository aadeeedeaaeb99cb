"""What the simulator counts for the mesh and for each baseline, and its latency model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Modelled request latency: a hit costs `hit_s`; a request that has to wait for a load also waits
    `load_fixed_s + size / load_bytes_per_s` (or what remains of a load already in progress).

    The fixed part is the runtime's setup per load (session creation, warm-up), the proportional part
    reading and deserializing the weights. Defaults are round numbers for ONNX-sized models from local
    disk; only ratios between runs on the same model mean anything.
    """

    hit_s: float = 0.002
    load_fixed_s: float = 0.5
    load_bytes_per_s: float = 500e6

    def load_s(self, size_bytes: int) -> float:
        return self.load_fixed_s + size_bytes / self.load_bytes_per_s


@dataclass(slots=True)
class Result:
    name: str
    requests: int = 0
    hits: int = 0  # a copy existed (loaded, or loading: the request waits for it but starts no load)
    waited: int = 0  # hits on a copy still loading
    loads: int = 0  # every load, extra and proactive ones included
    extra_loads: int = 0  # deliberate: extra copies and proactive loads
    removals: int = 0  # extra copies removed when cool (not evictions)
    evictions: int = 0
    load_bytes: int = 0
    rejected: int = 0  # no node could make room (churn guard, or the model is too large)
    duplicate_loads: int = 0  # a request's load of a model that had a copy somewhere: must stay 0
    latencies: list[float] = field(default_factory=list, repr=False)  # of served requests: not the rejected

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    def record(self, latency_s: float) -> None:
        self.latencies.append(latency_s)

    def as_dict(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def pct(p: float) -> float:
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000.0 if ordered else 0.0

        return {
            "hit_ratio": round(self.hit_ratio, 5),
            "requests": self.requests,
            "hits": self.hits,
            "waited": self.waited,
            "loads": self.loads,
            "extra_loads": self.extra_loads,
            "removals": self.removals,
            "evictions": self.evictions,
            "load_bytes": self.load_bytes,
            "rejected": self.rejected,
            "duplicate_loads": self.duplicate_loads,
            "latency_mean_ms": round(sum(ordered) * 1000.0 / len(ordered), 3) if ordered else 0.0,
            "latency_p50_ms": round(pct(0.50), 3),
            "latency_p99_ms": round(pct(0.99), 3),
        }
