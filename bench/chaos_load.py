"""Fixed-rate, checked inference load for the chaos soak: every answer is compared with numpy.

Runs stock tritonclient.grpc.aio on an event loop in a thread of its own, so fault injection in the
caller (which blocks while a node restarts) never stalls or bunches the load. Requests go round-robin
through every node at a fixed rate, each to a random model, each bounded by its own deadline; each is
recorded as answered right, answered wrong, or failed with its status.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

# tritonclient's default reconnect backoff grows to 120 s: a client would stay away from a restarted node.
CHANNEL_ARGS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000)]


@dataclass(frozen=True, slots=True)
class Outcome:
    sent_at: float  # time.monotonic()
    done_at: float
    node: int  # index of the node the request was sent to
    model: str
    result: str  # "ok", "wrong" or "failed"
    status: str = ""  # the gRPC status of a failure
    message: str = ""


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    x: np.ndarray  # the input every request of this model sends
    expected: np.ndarray  # numpy's answer to it


class CheckedLoad:
    def __init__(self, targets: list[str], models: list[Model], *, rate_per_s: float, seed: int,
                 timeout_s: float = 5.0, max_outstanding: int = 256) -> None:
        self._targets = targets
        self._models = models
        self._interval_s = 1.0 / rate_per_s
        self._rng = np.random.default_rng(seed)
        self._timeout_s = timeout_s
        # Bounds memory if every node hangs: past this many in flight a tick is recorded as failed, not sent.
        self._max_outstanding = max_outstanding
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="chaos-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def answered_since(self, node: int, since: float) -> bool:
        """Whether a request sent to `node` after `since` was answered right: its clients are through."""
        for outcome in reversed(self.outcomes):  # appended in the load's thread; a list append is atomic
            if outcome.sent_at <= since:
                return False
            if outcome.node == node and outcome.result == "ok":
                return True
        return False

    def stop(self) -> list[Outcome]:
        self._stop.set()
        self._thread.join(self._timeout_s + 10.0)
        return list(self.outcomes)

    async def _run(self) -> None:
        clients = [triton.InferenceServerClient(t, channel_args=CHANNEL_ARGS) for t in self._targets]
        pending: set[asyncio.Task[None]] = set()
        try:
            tick, i = time.monotonic(), 0
            while not self._stop.is_set():
                node, model = i % len(clients), self._models[int(self._rng.integers(len(self._models)))]
                if len(pending) < self._max_outstanding:
                    task = asyncio.create_task(self._one(clients[node], node, model))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                else:
                    now = time.monotonic()
                    self.outcomes.append(Outcome(now, now, node, model.name, "failed", "NOT_SENT",
                                                 "too many requests in flight"))
                i += 1
                tick += self._interval_s
                await asyncio.sleep(max(0.0, tick - time.monotonic()))
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for client in clients:
                await client.close()

    async def _one(self, client: triton.InferenceServerClient, node: int, model: Model) -> None:
        x = InferInput("INPUT0", list(model.x.shape), "FP32")
        x.set_data_from_numpy(model.x)
        sent = time.monotonic()
        try:
            answer = await client.infer(model.name, [x], client_timeout=self._timeout_s)
        except InferenceServerException as error:
            self.outcomes.append(Outcome(sent, time.monotonic(), node, model.name, "failed",
                                         str(error.status()), error.message() or ""))
            return
        got = answer.as_numpy("OUTPUT0")
        right = got is not None and np.allclose(got, model.expected, rtol=1e-4, atol=1e-5)
        self.outcomes.append(Outcome(sent, time.monotonic(), node, model.name, "ok" if right else "wrong"))
