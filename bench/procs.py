"""The bench's child processes (floor server, load generator) and what it reads from /proc about them."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

from bench.floor import READY_PREFIX


class ChildError(RuntimeError):
    """A bench child failed to start, answered with an error, or went silent."""


class _Child:
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
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class FloorProcess(_Child):
    def __init__(self, model: Path, name: str, timeout_s: float = 30.0) -> None:
        super().__init__([sys.executable, "-m", "bench.floor", "--model", str(model), "--name", name,
                          "--port", "0"], "floor")
        line = self.readline(timeout_s)
        if not line.startswith(READY_PREFIX):
            self.stop()
            raise ChildError(f"floor printed {line!r} instead of its port")
        self.target = f"127.0.0.1:{int(line[len(READY_PREFIX):])}"


class LoadGenProcess(_Child):
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
