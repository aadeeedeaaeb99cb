"""`python -m bench.mesh_hop` still runs end to end and reports every figure. Performance is never asserted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.mesh_hop import FIELDS, PATHS

ROOT = Path(__file__).resolve().parents[2]
TIME_LIMIT_S = 85.0


def _run_quick() -> dict[str, Any]:
    process = subprocess.Popen([sys.executable, "-m", "bench.mesh_hop", "--quick", "--json"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the bench then stops the etcd, nodes, proxy and load generators it started.
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
        pytest.fail(f"mesh_hop --quick took over {TIME_LIMIT_S:.0f} s; stderr:\n{err[-3000:]}")
    assert process.returncode == 0, f"mesh_hop exited {process.returncode}; stderr:\n{err[-3000:]}"
    result: dict[str, Any] = json.loads(out)
    return result


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


@pytest.mark.timeout(TIME_LIMIT_S + 40)
def test_quick_mesh_hop_reports_every_figure() -> None:
    result = _run_quick()
    summary = result["summary"]
    for key, _, _, _ in FIELDS:
        hop_only = key == "hop_cpu_us"  # path A has no hop process
        for path in PATHS:
            if not (hop_only and path == "A"):
                assert _positive(summary[key][path]["median"]), (key, path, summary[key][path])
    assert set(summary["added_p50_ms"]) == {"B", "C"}
    # The ratio's sign and size are noise in a one-round run: only its presence is checked.
    assert isinstance(summary["hop_ratio"]["median"], float) and isinstance(summary["hop_ratio"]["pass"], bool)
    assert all(_positive(v) for v in summary["b_over_c"].values())
    config = result["config"]
    assert config["owner"] != config["forwarder"] and {config["owner"], config["forwarder"]} == {"node-0", "node-1"}
    loaded = result["etcd"]["full_load"]
    assert _positive(loaded["seconds"]) and _positive(loaded["client_rps"])
    assert set(loaded["nodes"]) == {"node-0", "node-1"}
    for node in loaded["nodes"].values():
        assert _positive(node["api_requests_per_s"])
        assert node["etcd_writes_per_s"] >= 0  # zero writes in a short window is a fine answer
