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
    for metric in METRICS:
        row = summary[metric.key]
        for server in SERVERS:
            assert positive(row[server]["median"]), (metric.key, server, row[server])
        assert row["ratio"] == pytest.approx(row["node"]["median"] / row["floor"]["median"]), metric.key
        if metric.goal is not None:  # the verdict is the goal applied to the ratio, whatever the noise made it
            op, bound = metric.goal
            assert row["goal"] == f"{op} {bound:.2f}x", metric.key
            assert row["pass"] == (row["ratio"] <= bound if op == "<=" else row["ratio"] >= bound), metric.key
    cold = result["cold_start"]
    for key in ("node_total_median_s", "node_load_median_s", "node_first_infer_median_s",
                "ort_create_median_s"):
        assert positive(cold[key]), key
    assert all(positive(result["rss_mb"][s]) for s in SERVERS)
