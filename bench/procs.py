"""The bench's child processes (floor server, load generator), how a bench starts and stops its children,
the interleaved rounds it runs through them, and what it reads from /proc about them."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, TypeVar

from bench.floor import READY_PREFIX
from meshnode.local.process import terminate

SLACK_S = 60.0  # on top of a phase's own bound before the load generator counts as stuck
T = TypeVar("T")


class ChildError(RuntimeError):
    """A bench child failed to start, answered with an error, or went silent."""


class Signals:
    """SIGTERM and Ctrl-C unwind like exceptions, except while a child is started and registered
    for stopping: a signal landing between the two would leave that child running, so it waits."""

    def __init__(self) -> None:
        self._deferring, self._pending = False, 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._pending = signum
        if not self._deferring:
            self._raise()

    def _raise(self) -> NoReturn:
        if self._pending == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + self._pending)

    def start(self, stack: contextlib.ExitStack, start: Callable[[], T], stop: Callable[[T], object]) -> T:
        self._deferring = True
        try:
            child = start()
            stack.callback(stop, child)
        finally:
            self._deferring = False
        if self._pending:
            self._raise()
        return child


class Child:
    """A child on pipes: stdin stays open (its end tells the child to go), stdout lines are queued."""

    def __init__(self, args: list[str], name: str) -> None:
        self.name = name
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.tail: deque[str] = deque(maxlen=50)
        threading.Thread(target=self._pump, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.tail.append(line.rstrip())
            self._lines.put(line)
        self._lines.put(None)

    def readline(self, timeout_s: float) -> str:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise ChildError(f"{self.name} said nothing for {timeout_s:.0f} s") from None
        if line is None:
            raise ChildError(f"{self.name} exited with code {self.process.wait()}:\n" + "\n".join(self.tail))
        return line

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        terminate(self.process, timeout_s)


class FloorProcess(Child):
    def __init__(self, model: Path, name: str, timeout_s: float = 30.0, threads: int = 0) -> None:
        """`threads`: on grpcio's threaded server with that many workers (0: grpc.aio)."""
        super().__init__([sys.executable, "-m", "bench.floor", "--model", str(model), "--name", name,
                          "--port", "0", "--threads", str(threads)], "floor")
        line = self.readline(timeout_s)
        if not line.startswith(READY_PREFIX):
            self.stop()
            raise ChildError(f"floor printed {line!r} instead of its port")
        self.target = f"127.0.0.1:{int(line[len(READY_PREFIX):])}"


class LoadGenProcess(Child):
    def __init__(self) -> None:
        super().__init__([sys.executable, "-m", "bench.loadgen", "--commands"], "load generator")

    def run(self, timeout_s: float, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        answer: dict[str, Any] = json.loads(self.readline(timeout_s))
        if "error" in answer:
            raise ChildError(f"load generator {command['op']} on {command['target']}: {answer['error']}")
        failed = answer.get("errors")
        if failed:
            raise ChildError(f"{failed} failed requests in {command['op']} on {command['target']}, "
                             f"first: {answer['first_error']}")
        return answer


class Route(NamedTuple):
    """A path the load takes: where it is sent, the server processes behind it, and the hop in front of
    them (the process that forwards), if any."""

    target: str
    servers: list[int]
    hop: int | None = None


def measure(loadgen: LoadGenProcess, route: Route, model: str, phase: str, args: argparse.Namespace) -> dict[str, Any]:
    """One phase ("latency": c=1, "throughput") on one route, with the CPU per request of its processes
    read from /proc around it: all of them, and the hop's own."""
    pids = [*route.servers, *([] if route.hop is None else [route.hop])]
    cpu0 = [cpu_seconds(p) for p in pids]
    bound = args.requests * 0.1 if phase == "latency" else args.seconds
    answer = loadgen.run(bound + SLACK_S, op=phase, target=route.target, model=model, requests=args.requests,
                         concurrency=args.concurrency, seconds=args.seconds)
    used = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
    answer["server_cpu_us_per_req"] = sum(used) * 1e6 / answer["requests"]
    answer["hop_cpu_us_per_req"] = None if route.hop is None else used[-1] * 1e6 / answer["requests"]
    return answer


def run_rounds(loadgen: LoadGenProcess, paths: dict[str, Route], model: str,
               args: argparse.Namespace, log: Callable[[str], None],
               check: Callable[[str], None] = lambda path: None) -> list[dict[str, Any]]:
    """`args.rounds` rounds of both phases on every path, `check(path)` after each. Throughput on these
    shared machines swings by +-25% between rounds, so the paths take turns: each goes first, second, ...
    in rotation (fair when the rounds are a multiple of the paths)."""
    rounds, names = [], list(paths)
    for i in range(args.rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        result: dict[str, Any] = {"order": order}
        for path in order:
            result[path] = {phase: measure(loadgen, paths[path], model, phase, args)
                            for phase in ("latency", "throughput")}
            check(path)
            lat, thr = result[path]["latency"], result[path]["throughput"]
            log(f"round {i + 1}/{args.rounds} {path}: c=1 p50 {lat['p50_ms']:.3f} ms p99 {lat['p99_ms']:.3f} ms; "
                f"c={args.concurrency} {thr['rps']:.0f} req/s, {thr['server_cpu_us_per_req']:.0f} us/req")
        rounds.append(result)
    return rounds


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a whole process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name may contain spaces; the fields after its closing parenthesis are fixed.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every existing thread of `pid`; threads started later inherit it from their creator.

    sched_setaffinity(pid) alone would move only the main thread, leaving gRPC's and ORT's behind.
    """
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)
