"""`python -m bench.triton_sidecar` still runs end to end and reports every figure. Performance is never asserted."""

from __future__ import annotations

import math

import pytest

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
