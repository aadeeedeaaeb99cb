"""`python -m bench.triton_sidecar` still runs end to end and reports every figure. Performance is never asserted."""

from __future__ import annotations

import pytest

from bench.triton_sidecar import PATHS, RATIO_KEYS
from tests.integration.helpers import assert_every_path_figure, positive, run_quick_bench

TIME_LIMIT_S = 60.0


@pytest.mark.timeout(TIME_LIMIT_S + 30)
def test_quick_triton_sidecar_bench_reports_every_figure() -> None:
    result = run_quick_bench("bench.triton_sidecar", TIME_LIMIT_S)
    summary = result["summary"]
    assert_every_path_figure(summary, PATHS, no_hop={"direct"})
    for key in RATIO_KEYS:
        assert positive(summary[key]["node/direct"]["median"]) and positive(summary[key]["proxy/direct"]["median"])
        # One round is noise: the bare hop may measure free, and then there is no extra-cost ratio (NaN).
        assert isinstance(summary[key]["extra"]["median"], float), key
    assert positive(summary["p50_ratio"]["median"]) and isinstance(summary["p50_ratio"]["pass"], bool)
    assert set(summary["added_p50_ms"]) == {"proxy", "node"}
    assert all(positive(mb) for mb in result["config"]["rss_mb"].values())
