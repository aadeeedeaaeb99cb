"""bench.chaos --quick: one round of every fault kind against a 3-node mesh (beside Tritons too), within the
smoke budget.

Its goals are the issue's: no wrong answer ever, and no failed request at a node that was up for a
model that was servable (failures the fault itself caused are counted apart, as excused)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(200)
@pytest.mark.parametrize("triton", [False, True], ids=["onnxruntime", "triton"])
def test_quick_chaos_soak_loses_and_corrupts_nothing(triton: bool) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.chaos", "--quick", "--json", "--seed", "7",
                           *(["--triton"] if triton else [])], capture_output=True, text=True, timeout=190)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    by_kind = result["by_kind"]
    assert {kind: row["faults"] for kind, row in by_kind.items() if kind != "steady"} == {
        "kill9": 1, "drain": 1, "etcd": 1, "unreadable": 1} | ({"triton": 1} if triton else {})
    totals = result["totals"]
    assert totals["wrong"] == 0, by_kind
    assert totals["failed"] == 0, {kind: row["failures"] for kind, row in by_kind.items()}
    # Fixed rate: about rate x duration requests went out, and every one was accounted for.
    expected = result["config"]["rate"] * result["config"]["seconds"]
    assert 0.8 * expected <= totals["sent"] <= 1.2 * expected + 20
    assert totals["sent"] == totals["ok"] + totals["failed"] + totals["excused"] + totals["wrong"]
