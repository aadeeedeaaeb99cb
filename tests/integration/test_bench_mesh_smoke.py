"""`python -m bench.mesh_hop` still runs end to end and reports every figure. Performance is never asserted."""

from __future__ import annotations

import pytest

from bench.mesh_hop import PATHS
from tests.integration.helpers import assert_every_path_figure, positive, run_quick_bench

TIME_LIMIT_S = 85.0


@pytest.mark.timeout(TIME_LIMIT_S + 40)
def test_quick_mesh_hop_reports_every_figure() -> None:
    result = run_quick_bench("bench.mesh_hop", TIME_LIMIT_S)
    summary = result["summary"]
    assert_every_path_figure(summary, PATHS, no_hop={"A"})
    assert set(summary["added_p50_ms"]) == {"B", "C"}
    # The ratio's sign and size are noise in a one-round run: only its presence is checked.
    assert isinstance(summary["hop_ratio"]["median"], float) and isinstance(summary["hop_ratio"]["pass"], bool)
    assert all(positive(v) for v in summary["b_over_c"].values())
    config = result["config"]
    assert config["owner"] != config["forwarder"] and {config["owner"], config["forwarder"]} == {"node-0", "node-1"}
    loaded = result["etcd"]["full_load"]
    assert positive(loaded["seconds"]) and positive(loaded["client_rps"])
    assert set(loaded["nodes"]) == {"node-0", "node-1"}
    for node in loaded["nodes"].values():
        assert positive(node["api_requests_per_s"])
        assert node["etcd_writes_per_s"] >= 0  # zero writes in a short window is a fine answer
