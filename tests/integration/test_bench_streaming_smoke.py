"""`python -m bench.streaming` still runs end to end and reports every figure. Performance is never asserted."""

from __future__ import annotations

import pytest

from bench.streaming import FIGURES, PATHS
from tests.integration.helpers import positive, run_quick_bench

RATIOS = {"node/direct": ("node", "direct"), "hop/direct": ("hop", "direct"), "hop/node": ("hop", "node")}


@pytest.mark.timeout(90)
def test_quick_streaming_bench_reports_every_figure() -> None:
    figures = run_quick_bench("bench.streaming", time_limit_s=60.0)["summary"]
    for key in FIGURES:
        medians = {name: figure["median"] for name, figure in figures[key].items()}
        assert all(positive(medians[path]) for path in PATHS), (key, medians)
        for ratio, (over, under) in RATIOS.items():  # each ratio is its one round's
            assert medians[ratio] == pytest.approx(medians[over] / medians[under]), (key, ratio)
