"""`make bench` still runs end to end and reports every figure. Performance itself is never asserted."""

from __future__ import annotations

import pytest

from bench.report import METRICS, SERVERS
from tests.integration.helpers import positive, run_quick_bench

TIME_LIMIT_S = 60.0


@pytest.mark.timeout(TIME_LIMIT_S + 30)
def test_quick_bench_reports_every_figure() -> None:
    result = run_quick_bench("bench.node_vs_floor", TIME_LIMIT_S)
    summary = result["summary"]
    assert isinstance(summary, dict)
    for metric in METRICS:
        row = summary[metric.key]
        for server in SERVERS:
            assert positive(row[server]["median"]), (metric.key, server, row[server])
        assert positive(row["ratio"]), metric.key
        if metric.goal is not None:
            assert row["goal"] and isinstance(row["pass"], bool)
    cold = result["cold_start"]
    assert isinstance(cold, dict)
    for key in ("node_total_median_s", "node_load_median_s", "node_first_infer_median_s",
                "ort_create_median_s"):
        assert positive(cold[key]), key
    rss = result["rss_mb"]
    assert isinstance(rss, dict) and all(positive(rss[s]) for s in SERVERS)
