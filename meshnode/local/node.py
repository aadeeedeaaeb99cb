"""Start a `meshserve node` as a real child process and learn its ports from its ready line.

Used by the integration tests, the bench, the demo and `meshserve local`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from meshnode.local.process import LaunchError, terminate
from meshnode.node import READY_LINE

_READY = re.compile(re.escape(READY_LINE) + r" grpc=(\S+):(\d+)(?: metrics=\S+:(\d+))? instance=(\S+)"
                                           r"(?: peer=\S+:(\d+))?")


class NodeProcess:
    def __init__(self, process: subprocess.Popen[str], host: str, port: int, metrics_port: int | None,
                 instance_id: str, log_tail: deque[str], peer_port: int | None = None) -> None:
        self.process = process
        self.peer_port = peer_port  # with peer mutual TLS: where peers call it
        self.host = host
        self.port = port
        self.metrics_port = metrics_port
        self.instance_id = instance_id
        self._log_tail = log_tail

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def start(
        cls, *, etcd: str, model_repository: Path | str, capacity: str | int, etcd_prefix: str = "meshserve",
        port: int = 0, metrics_port: int | None = 0, instance_id: str | None = None,
        extra_args: list[str] | None = None, env: dict[str, str] | None = None, timeout_s: float = 30.0,
        log_file: Path | None = None, host: str = "127.0.0.1", wrapper: Sequence[str] = (),
    ) -> NodeProcess:
        """wrapper: the command runs under it, e.g. `ip netns exec NS` (a node on a host of its own)."""
        args = [*wrapper, sys.executable, "-m", "meshnode", "node", "--etcd", etcd, "--etcd-prefix", etcd_prefix,
                "--host", host, "--port", str(port), "--model-repository", str(model_repository),
                "--capacity", str(capacity)]
        if metrics_port is not None:
            args += ["--metrics-port", str(metrics_port)]
        if instance_id:
            args += ["--instance-id", instance_id]
        args += extra_args or []
        child_env = {**os.environ, **(env or {})}
        if metrics_port is None:
            child_env.pop("MESHSERVE_METRICS_PORT", None)
        log = open(log_file, "a") if log_file else None  # noqa: SIM115 - lives as long as the child
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log or subprocess.STDOUT, text=True,
                                   env=child_env)
        tail: deque[str] = deque(maxlen=200)
        found: list[re.Match[str]] = []
        ready = threading.Event()

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                tail.append(line.rstrip())
                if not found and (match := _READY.search(line)):
                    found.append(match)
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.05) and time.monotonic() < deadline:
            pass
        if not found:
            process.kill()
            process.wait()
            raise LaunchError("meshserve node did not become ready:\n" + "\n".join(tail))
        match = found[0]
        return cls(process, match.group(1), int(match.group(2)),
                   int(match.group(3)) if match.group(3) else None, match.group(4), tail,
                   int(match.group(5)) if match.group(5) else None)

    def log(self) -> str:
        return "\n".join(self._log_tail)

    def stop(self, timeout_s: float = 15.0) -> int:
        terminate(self.process, timeout_s)  # SIGTERM: the node drains first
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: the node gets no chance to clean up (fault tests)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
