"""Small helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from meshnode.local.node import NodeProcess
from meshnode.net import transport

ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.05  # often enough that a wait ends close to the event, rarely enough to add no load of its own


async def wait_until(condition: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Polls `condition` (plain or async) until it holds; fails naming `what` once `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while not await _holds(condition()):
        _fail_after(deadline, timeout_s, what)
        await asyncio.sleep(POLL_S)


def wait_until_blocking(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """wait_until for synchronous tests."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        _fail_after(deadline, timeout_s, what)
        time.sleep(POLL_S)


async def _holds(result: bool | Awaitable[bool]) -> bool:
    return await result if inspect.isawaitable(result) else result


def _fail_after(deadline: float, timeout_s: float, what: str) -> None:
    if time.monotonic() >= deadline:
        pytest.fail(f"gave up waiting for {what} after {timeout_s:g} s")


def metric(node: NodeProcess, name: str) -> float:
    """One unlabelled sample from the node's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10).read().decode()
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def run_quick_bench(module: str, time_limit_s: float) -> dict[str, Any]:
    """`python -m <module> --quick --json` from the repository root; its JSON answer."""
    process = subprocess.Popen([sys.executable, "-m", module, "--quick", "--json"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=time_limit_s)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the bench then stops every process it started.
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
        pytest.fail(f"{module} --quick took over {time_limit_s:.0f} s; stderr:\n{err[-3000:]}")
    assert process.returncode == 0, f"{module} exited {process.returncode}; stderr:\n{err[-3000:]}"
    result: dict[str, Any] = json.loads(out)
    return result


def positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


def assert_every_path_figure(summary: dict[str, Any], paths: Iterable[str], no_hop: set[str]) -> None:
    """A path bench's summary has every PATH_FIELDS figure for every path (hop CPU only where there is a hop)."""
    from bench.report import PATH_FIELDS  # imported here: the other tests have no use for the bench

    for key, _, _, _ in PATH_FIELDS:
        for path in paths:
            if not (key == "hop_cpu_us" and path in no_hop):
                assert positive(summary[key][path]["median"]), (key, path, summary[key][path])


async def manage(target: str, method: str, request: object, deadline_s: float = 60.0) -> Any:
    """One call of the management service on the node at `target`."""
    async with transport.create_channel(target) as channel:
        return await getattr(transport.ManagementStub(channel), method)(request, timeout=deadline_s)
