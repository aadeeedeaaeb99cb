"""A model's inference timeout (`--timeout-ms`, `"timeout_ms"` in load_model's config) on a real node: a slow
ONNX model answers DEADLINE_EXCEEDED naming it long before its run would end, another model on the node goes
on being answered meanwhile, a new timeout reaches the loaded copy, and the node stays healthy."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from deploy.local.models import write_matmul_chain, write_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from meshpb import mpb
from tests.integration.conftest import start_node
from tests.integration.helpers import manage

pytestmark = pytest.mark.timeout(30)

# Four MatMuls of 2048 x 2048 (a 64 MB file): one inference runs ~0.6 s on one core of the 2-core machine.
WIDTH, DEPTH = 2048, 4
SLOW_INPUT = np.linspace(-1, 1, WIDTH, dtype=np.float32).reshape(1, WIDTH)
FAST_INPUT = np.ones((1, 16), np.float32)
EXCEEDED = "inference of model 'slow' version 1 exceeded its timeout of 100 ms"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The node's repository (a fast model), and the slow model's directory outside it."""
    repo = tmp_path_factory.mktemp("timeout-repo")
    write_mlp(repo, "fast", approx_bytes=20_000)
    return repo, write_matmul_chain(tmp_path_factory.mktemp("timeout-slow"), "slow", width=WIDTH, depth=DEPTH)


@pytest.fixture(scope="module")
def node(etcd: EtcdProcess, dirs: tuple[Path, Path]) -> Iterator[NodeProcess]:
    process = start_node(etcd, dirs[0], capacity="512MiB", extra_args=["--no-proactive-loads"])
    yield process
    process.stop()


def inputs(x: np.ndarray) -> list[grpcclient.InferInput]:
    return [grpcclient.InferInput("INPUT0", list(x.shape), "FP32").set_data_from_numpy(x)]


def cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshnode", *args, "--target", node.target],
                          capture_output=True, text=True, timeout=20)


@dataclass
class Answer:
    sent: float  # time.monotonic()
    answered: float
    error: InferenceServerException | None

    @property
    def seconds(self) -> float:
        return self.answered - self.sent


def slow_request(node: NodeProcess, client_timeout: float | None = None) -> Answer:
    """One request to 'slow' from a client of its own."""
    with grpcclient.InferenceServerClient(node.target) as client:
        sent = time.monotonic()
        try:
            client.infer("slow", inputs(SLOW_INPUT), client_timeout=client_timeout)
        except InferenceServerException as error:
            return Answer(sent, time.monotonic(), error)
        return Answer(sent, time.monotonic(), None)


def test_a_slow_model_past_its_timeout_is_deadline_exceeded_while_the_node_serves_on(
        node: NodeProcess, dirs: tuple[Path, Path]) -> None:
    registered = cli(node, "models", "register", "slow", str(dirs[1]), "--timeout-ms", "100")  # loads it here
    assert registered.returncode == 0, registered.stderr
    assert "inference timeout: 100 ms" in registered.stdout

    with grpcclient.InferenceServerClient(node.target) as client:
        for _ in range(10):  # loaded, and timed as fast (it now runs on the event loop)
            client.infer("fast", inputs(FAST_INPUT))

        # Requests to 'fast', one after another, from the slow request until well after its abandoned run has
        # ended in the node's worker thread.
        fast: list[Answer] = []
        outcome: list[Answer] = []
        thread = threading.Thread(target=lambda: outcome.append(slow_request(node)))
        thread.start()
        window_ends = time.monotonic() + 1.5
        while time.monotonic() < window_ends:
            sent = time.monotonic()
            assert client.infer("fast", inputs(FAST_INPUT)).as_numpy("OUTPUT0").shape == (1, 4)
            fast.append(Answer(sent, time.monotonic(), None))
        thread.join(10)
        timed_out = outcome[0]
        assert timed_out.error is not None, f"'slow' answered in {timed_out.seconds:.3f} s, within its 100 ms"
        assert timed_out.error.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert EXCEEDED in (timed_out.error.message() or "")

        # The node answers normally afterwards, and its status says what the timeout is.
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("slow")
        client.infer("fast", inputs(FAST_INPUT))

        # A new timeout, through load_model's config JSON, reaches the loaded copy (no reload): the run now
        # ends, and shows how long the one abandoned above would have taken.
        client.load_model("slow", config='{"timeout_ms": 10000}')
        full = slow_request(node)
        assert full.error is None, full.error

    slowest = max(a.seconds for a in fast)
    print(f"timed out after {timed_out.seconds * 1000:.0f} ms; a full run takes {full.seconds * 1000:.0f} ms; "
          f"'fast' answered {len(fast)} times meanwhile, slowest in {slowest * 1000:.0f} ms")
    assert timed_out.seconds < full.seconds / 2  # abandoned well before it would have finished
    assert any(timed_out.sent < a.sent and a.answered < timed_out.answered for a in fast)  # served meanwhile
    assert slowest < full.seconds / 2  # never queued behind the slow run, nor after it was abandoned
    status = asyncio.run(manage(node.target, "GetModelStatus", mpb.GetModelStatusRequest(name="slow")))
    assert status.timeout_ms == 10_000 and [c.state for c in status.copies] == ["loaded"]
    assert "Traceback" not in node.log()


def test_a_shorter_client_deadline_still_ends_the_request_as_before(node: NodeProcess, dirs: tuple[Path, Path]) -> None:
    registered = cli(node, "models", "register", "slow", str(dirs[1]), "--timeout-ms", "5000")
    assert registered.returncode == 0, registered.stderr
    answer = slow_request(node, client_timeout=0.1)
    assert answer.error is not None and answer.error.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "exceeded its timeout" not in (answer.error.message() or "")  # the client's deadline, as grpc says it
    assert answer.seconds < 0.5
    status = cli(node, "models", "status", "slow")
    assert status.returncode == 0 and "inference timeout: 5000 ms" in status.stdout
    with grpcclient.InferenceServerClient(node.target) as client:
        assert client.infer("fast", inputs(FAST_INPUT)).as_numpy("OUTPUT0").shape == (1, 4)
