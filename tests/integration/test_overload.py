"""Overload on a real node: a slow ONNX model offered far more concurrent requests than it can serve.

The node has small bounds (4 requests waiting per model, 2 run at once); for a few seconds many clients
send back to back. The excess is refused at once with RESOURCE_EXHAUSTED naming the model, what is accepted
is answered correctly, the node's memory stays bounded, and a normal request is answered within a second
once the load stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from deploy.local.models import write_matmul_chain
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from tests.integration.conftest import start_node
from tests.integration.helpers import metric

pytestmark = pytest.mark.timeout(60)

# One MatMul of 2048 x 2048 (a 16 MB file): ~0.2 s per inference on one core here, ~0.3 s with two at once.
WIDTH, DEPTH = 2048, 1
MAX_QUEUED, RUNS_AT_ONCE = 4, 2  # --max-queued-per-model; --infer-workers stays at its default of 2
CLIENTS = 40  # concurrent callers: several times the RUNS_AT_ONCE + MAX_QUEUED the copy takes
LOAD_S = 4.0  # how long they offer load
MAX_REQUESTS = 2000  # and at most this many requests in all
BACKOFF_S = 0.05  # a refused caller's pause before it tries again, as a client would back off
INPUTS = [np.random.default_rng(seed).standard_normal((1, WIDTH)).astype(np.float32) for seed in range(4)]
RSS_GROWTH_BOUND = 200 * 2**20  # generous: an unbounded queue of these requests would grow without end


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_matmul_chain(tmp_path_factory.mktemp("overload-repo"), "slow", width=WIDTH, depth=DEPTH)


@pytest.fixture(scope="module")
def node(etcd: EtcdProcess, model_dir: Path) -> Iterator[NodeProcess]:
    process = start_node(etcd, model_dir.parent, capacity="256MiB",
                         extra_args=["--max-queued-per-model", str(MAX_QUEUED), "--max-inflight", "64",
                                     "--no-proactive-loads"])
    yield process
    process.stop()


def references(model_dir: Path) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return [session.run(None, {"INPUT0": x})[0] for x in INPUTS]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def inputs(x: np.ndarray) -> list[aioclient.InferInput]:
    inp = aioclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


@dataclass
class Outcomes:
    answered: list[tuple[int, np.ndarray, float]] = field(default_factory=list)  # (input, output, seconds)
    refused: list[tuple[str, float]] = field(default_factory=list)  # (message, seconds)
    other: list[str] = field(default_factory=list)  # any other failure

    @property
    def sent(self) -> int:
        return len(self.answered) + len(self.refused) + len(self.other)


async def offer_load(target: str, until: float, outcomes: Outcomes) -> None:
    async def caller(index: int) -> None:
        async with aioclient.InferenceServerClient(target) as client:
            turn = index
            while time.monotonic() < until and outcomes.sent < MAX_REQUESTS:
                which = turn % len(INPUTS)
                turn += 1
                started = time.monotonic()
                try:
                    result = await client.infer("slow", inputs(INPUTS[which]), client_timeout=20)
                except InferenceServerException as error:
                    took = time.monotonic() - started
                    if error.status() == "StatusCode.RESOURCE_EXHAUSTED":
                        outcomes.refused.append((error.message() or "", took))
                        await asyncio.sleep(BACKOFF_S)
                    else:
                        outcomes.other.append(f"{error.status()}: {error.message()}")
                    continue
                output = result.as_numpy("OUTPUT0")
                assert output is not None
                outcomes.answered.append((which, output, time.monotonic() - started))

    await asyncio.gather(*(caller(i) for i in range(CLIENTS)))


async def test_the_excess_is_refused_at_once_the_rest_answered_and_the_node_recovers(
        node: NodeProcess, model_dir: Path) -> None:
    expected = references(model_dir)
    async with aioclient.InferenceServerClient(node.target) as client:
        # Loaded, and warmed with as many runs at once as the copy runs, so that ORT's buffers are sized.
        warm = await asyncio.gather(*(client.infer("slow", inputs(INPUTS[i])) for i in range(RUNS_AT_ONCE)))
        for i, result in enumerate(warm):
            np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected[i], rtol=1e-3, atol=1e-3)
    rss_before = rss_bytes(node.process.pid)

    outcomes = Outcomes()
    started = time.monotonic()
    await offer_load(node.target, started + LOAD_S, outcomes)
    drained_s = time.monotonic() - started - LOAD_S  # the backlog left when the load stopped

    assert outcomes.other == []
    assert outcomes.refused, "no request was refused: the load did not exceed the bounds"
    assert len(outcomes.answered) >= LOAD_S / 0.5, f"only {len(outcomes.answered)} answered in {LOAD_S} s"
    for message, _ in outcomes.refused:
        assert message.startswith("overloaded: model 'slow': every copy ("), message
        assert f"(--max-queued-per-model {MAX_QUEUED})" in message, message
    refused_s = sorted(took for _, took in outcomes.refused)
    # At once: the median well under one inference's time, even with both cores busy running it.
    assert refused_s[len(refused_s) // 2] < 0.1 and refused_s[-1] < 1.0, refused_s[-5:]
    for which, output, _ in outcomes.answered:
        np.testing.assert_allclose(output, expected[which], rtol=1e-3, atol=1e-3)
    # An accepted request waits behind at most MAX_QUEUED others, two at a time: never a growing backlog.
    assert max(took for _, _, took in outcomes.answered) < 5.0
    assert drained_s < 3.0

    growth = rss_bytes(node.process.pid) - rss_before
    assert growth < RSS_GROWTH_BOUND, f"node RSS grew by {growth / 2**20:.0f} MiB"
    assert metric(node, "meshserve_requests_rejected_total") == len(outcomes.refused)
    assert metric(node, "meshserve_requests_queued") == 0
    assert metric(node, "modelmesh_req_queue_delay_milliseconds_count") >= len(outcomes.answered)

    async with aioclient.InferenceServerClient(node.target) as client:
        asked = time.monotonic()
        result = await client.infer("slow", inputs(INPUTS[0]), client_timeout=5)
        assert time.monotonic() - asked < 1.0
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected[0], rtol=1e-3, atol=1e-3)
    print(f"\n  sent {outcomes.sent}: answered {len(outcomes.answered)}, refused {len(outcomes.refused)} "
          f"(median {refused_s[len(refused_s) // 2] * 1000:.1f} ms, max {refused_s[-1] * 1000:.1f} ms); "
          f"drained in {drained_s:.2f} s; RSS {growth / 2**20:+.0f} MiB\n  {outcomes.refused[0][0]}")
