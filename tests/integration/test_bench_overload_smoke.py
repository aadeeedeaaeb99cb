"""bench.overload --seconds 3: the soak runs through and its invariants hold, loosely (its goals are figures to read,
not timed assertions): every offered request came back answered right, refused with RESOURCE_EXHAUSTED or past its
deadline, none lost, and the node answered normally after the load stopped."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.helpers import ROOT


@pytest.mark.timeout(150)
def test_a_short_overload_soak_loses_nothing_and_answers_only_ok_refused_or_late() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.overload", "--seconds", "3", "--capacity-seconds", "2",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    counts = result["counts"]
    assert counts["other"] == {}, counts["first_other"]  # no wrong answer, no other status, nothing left unsent
    assert counts["offered"] == counts["answered"] + counts["refused"] + counts["late"]
    # Offered at a fixed rate: about the rate for the duration, and far more than was answered.
    expected = result["offered_rps"] * result["config"]["seconds"]
    assert 0.7 * expected <= counts["offered"] <= 1.1 * expected + 20
    assert counts["answered"] > 0 and counts["refused"] > 0
