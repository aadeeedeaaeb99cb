"""`python -m bench.triton_sidecar` and `bench.hot_path` still run end to end and report every figure. Performance
is never asserted."""

from __future__ import annotations

import math

import pytest

from bench.hot_path import GOALS, NODES
from bench.hot_path import PATHS as HOT_PATHS
from bench.triton_sidecar import MORE_IS_BETTER, P50_GOAL, PATHS, RATIO_KEYS
from tests.integration.helpers import assert_every_path_figure, positive, run_quick_bench

TIME_LIMIT_S = 60.0


@pytest.mark.timeout(TIME_LIMIT_S + 30)
def test_quick_triton_sidecar_bench_reports_every_figure() -> None:
    result = run_quick_bench("bench.triton_sidecar", TIME_LIMIT_S)
    summary = result["summary"]
    assert_every_path_figure(summary, PATHS, no_hop={"direct"})
    for key in RATIO_KEYS:  # one round: each ratio is that round's
        direct, proxy, node = (summary[key][path]["median"] for path in ("direct", "proxy", "node"))
        assert summary[key]["node/direct"]["median"] == pytest.approx(node / direct), key
        assert summary[key]["proxy/direct"]["median"] == pytest.approx(proxy / direct), key
        extra = summary[key]["extra"]["median"]
        # One round is noise: the bare hop may measure free, and then there is no extra-cost ratio (NaN).
        if (proxy - direct) * (-1 if key in MORE_IS_BETTER else 1) > 0:
            assert extra == pytest.approx((node - direct) / (proxy - direct)), key
        else:
            assert math.isnan(extra), key
    p50_ratio = summary["p50_ratio"]
    assert p50_ratio["median"] == summary["p50_ms"]["node/direct"]["median"]
    assert p50_ratio["pass"] == (p50_ratio["median"] <= P50_GOAL)
    assert set(summary["added_p50_ms"]) == {"proxy", "node"}
    assert all(positive(mb) for mb in result["config"]["rss_mb"].values())


@pytest.mark.timeout(TIME_LIMIT_S + 30)
def test_quick_hot_path_bench_puts_both_nodes_beside_both_floors_and_triton() -> None:
    result = run_quick_bench("bench.hot_path", TIME_LIMIT_S)
    summary = result["summary"]
    assert_every_path_figure(summary, HOT_PATHS, no_hop=set(HOT_PATHS))
    for key in ("p50_ms", "rps", "server_cpu_us"):  # one round: each ratio is that round's
        triton = summary[key]["triton"]["median"]
        for path in HOT_PATHS:
            assert summary[key]["vs_triton"][path]["median"] == pytest.approx(summary[key][path]["median"] / triton)
    goals = {key: (op, bound) for key, op, bound in GOALS}
    assert {(g["path"], g["figure"]) for g in summary["goals"]} == {(path, key) for path in NODES for key in goals}
    for goal in summary["goals"]:
        op, bound = goals[goal["figure"]]
        ratio = summary[goal["figure"]]["vs_triton"][goal["path"]]["median"]
        assert goal["pass"] == (ratio >= bound if op == ">=" else ratio <= bound), goal
    assert set(result["config"]["rss_mb"]) == set(HOT_PATHS)
