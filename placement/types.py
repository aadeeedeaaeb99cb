"""What placement sees of the mesh: frozen snapshots, built by the node from its etcd view."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

LOADING = "loading"
LOADED = "loaded"


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node's published instance record."""

    instance_id: str
    endpoint: str
    capacity_bytes: int
    used_bytes: int
    model_count: int = 0
    lru_time_s: float | None = None  # last use of its least recently used model; None when empty
    request_rate: float = 0.0  # requests per second, smoothed
    inflight: int = 0
    loads_in_progress: int = 0
    shutting_down: bool = False
    version: str = ""
    runtime: str = ""  # what runs its models: "onnxruntime", "triton", ...
    runtime_down: bool = False  # its runtime is unreachable: it routes, but holds no copy and loads nothing

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def cache_age_s(self, now: float) -> float:
        """How long the node's least valuable model has been idle; an empty node is infinitely old."""
        return float("inf") if self.lru_time_s is None else max(0.0, now - self.lru_time_s)


@dataclass(frozen=True, slots=True)
class CopyView:
    instance_id: str
    state: str  # LOADING or LOADED
    since: float  # wall clock of the load's start or completion
    versions: tuple[str, ...] = ()  # the model's versions held there; () when not known


@dataclass(frozen=True, slots=True)
class FailureView:
    instance_id: str
    at: float
    message: str


@dataclass(frozen=True, slots=True)
class ModelView:
    name: str
    size_bytes: int  # measured if any node loaded it, else the hint or prediction
    copies: tuple[CopyView, ...] = ()
    failures: tuple[FailureView, ...] = ()
    last_used: float | None = None
    runtime: str = ""  # the runtime its nodes must run; "" for any
    newest_version: str = ""  # the newest version any copy holds: what a request without a version likely wants


@dataclass(frozen=True, slots=True)
class MeshSnapshot:
    nodes: Mapping[str, NodeView] = field(default_factory=dict)
    revision: int = 0
