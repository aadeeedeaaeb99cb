"""The mesh-wide model counts one node reports for the whole mesh (ModelMesh's leader gauges), from the
registry's records."""

from __future__ import annotations

from collections.abc import Container, Iterable

from meshnode.observability.metrics import MeshTotals
from meshnode.state.registry import ModelRecord
from placement.types import LOADED


def mesh_totals(in_use: Iterable[ModelRecord], managed: int, live: Container[str], now: float,
                failure_window_s: float) -> MeshTotals:
    """Models with a loaded copy on a live node, with a load failure in the last `failure_window_s`, and all
    (`managed`). Only records in use (copies or failures) can count for the first two."""
    loaded = failed = 0
    for record in in_use:
        loaded += any(c["state"] == LOADED for c in record.live_copies(live).values())
        failed += any(now - f["at"] < failure_window_s for f in record.failures.values())
    return MeshTotals(models_loaded=loaded, models_with_failure=failed, models_managed=managed)
