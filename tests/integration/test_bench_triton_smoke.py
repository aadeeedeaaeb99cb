"""`python -m bench.triton_sidecar` still runs end to end and reports every figure. Performance is never asserted."""

from __future__ import annotations

import pytest

from bench.triton_sidecar import FIELDS, PATHS
from tests.integration.helpers import positive, run_quick_bench

TIME_LIMIT_S = 60.0


@pytest.mark.timeout(TIME_LIMIT_S + 30)
def test_quick_triton_sidecar_bench_reports_every_figure() -> None:
    result = run_quick_bench("bench.triton_sidecar", TIME_LIMIT_S)
    summary = result["summary"]
    for key, _, _, _ in FIELDS:
        for path in PATHS:
            assert positive(summary[key][path]["median"]), (key, path, summary[key][path])
        assert positive(summary[key]["ratio"]), key
    assert positive(summary["p50_ratio"]["median"]) and isinstance(summary["p50_ratio"]["pass"], bool)
    rss = result["config"]["rss_mb"]
    assert positive(rss["node"]) and positive(rss["triton"])
