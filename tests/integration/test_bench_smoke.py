"""`make bench` still runs end to end and reports every figure. Performance itself is never asserted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import METRICS, SERVERS

ROOT = Path(__file__).resolve().parents[2]
TIME_LIMIT_S = 60.0


def _run_quick_bench() -> dict[str, object]:
    process = subprocess.Popen([sys.executable, "-m", "bench.node_vs_floor", "--quick", "--json"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the bench then stops the etcd, node and floor it started.
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
        pytest.fail(f"bench --quick took over {TIME_LIMIT_S:.0f} s; stderr:\n{err[-3000:]}")
    assert process.returncode == 0, f"bench exited {process.returncode}; stderr:\n{err[-3000:]}"
    result: dict[str, object] = json.loads(out)
    return result


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


@pytest.mark.timeout(TIME_LIMIT_S + 30)
def test_quick_bench_reports_every_figure() -> None:
    result = _run_quick_bench()
    summary = result["summary"]
    assert isinstance(summary, dict)
    for metric in METRICS:
        row = summary[metric.key]
        for server in SERVERS:
            assert _positive(row[server]["median"]), (metric.key, server, row[server])
        assert _positive(row["ratio"]), metric.key
        if metric.goal is not None:
            assert row["goal"] and isinstance(row["pass"], bool)
    cold = result["cold_start"]
    assert isinstance(cold, dict)
    for key in ("node_total_median_s", "node_load_median_s", "node_first_infer_median_s",
                "ort_create_median_s"):
        assert _positive(cold[key]), key
    rss = result["rss_mb"]
    assert isinstance(rss, dict) and all(_positive(rss[s]) for s in SERVERS)
