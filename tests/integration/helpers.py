"""Small helpers shared by the integration tests."""

from __future__ import annotations

import re
import urllib.request

from meshnode.node_process import NodeProcess


def metric(node: NodeProcess, name: str) -> float:
    """One unlabelled sample from the node's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10).read().decode()
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))
