"""What the throw-away server children (EtcdProcess, TritonProcess) share, and how any child is stopped.

A server here runs in its own session on free loopback ports, writes a log file, and counts as started
once an HTTP health probe says so; every startup error quotes this run's part of the log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Self

HOST = "127.0.0.1"
PORT_ATTEMPTS = 3


def free_ports(n: int) -> list[int]:
    # All held open together so the kernel cannot hand out the same port twice.
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def terminate(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, then SIGKILL if it is still alive after `timeout`; returns once it is reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


class LaunchError(Exception):
    """A server process (etcd, Triton, a node) did not start; the message carries its log's tail."""


class ServerProcess(ABC):
    """One server child. Subclasses say how to run it, where it logs and how to ask whether it is ready."""

    NAME: ClassVar[str]  # in error messages: "etcd", "tritonserver"
    ERROR: ClassVar[type[LaunchError]]  # raised for a server that does not start
    TAIL_LINES: ClassVar[int] = 30  # of the log, in startup errors

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    # What each server says for itself: its log file, its address (for errors), its command line and
    # environment, and the URL that answers 200 once it serves (with _healthy to read the body, if need be).
    @property
    @abstractmethod
    def log_path(self) -> Path: ...
    @property
    @abstractmethod
    def _address(self) -> str: ...
    @abstractmethod
    def _args(self) -> list[str]: ...
    @abstractmethod
    def _env(self) -> dict[str, str]: ...
    @abstractmethod
    def _ready_url(self) -> str: ...
    @abstractmethod
    def stop(self, timeout: float = 10.0) -> None: ...

    def _healthy(self, body: bytes) -> bool:
        return True

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @classmethod
    def _start_on_free_ports(cls, ports: int, make: Callable[[list[int]], Self], ready_timeout: float,
                             stop_timeout: float, after_failure: Callable[[], None] = lambda: None) -> Self:
        """make(ports) and launch it, on fresh ports again (at most PORT_ATTEMPTS times) if one was taken."""
        attempt = 0
        while True:
            attempt += 1
            server = make(free_ports(ports))
            try:
                server._launch(ready_timeout)
                return server
            except BaseException as error:
                # Also on Ctrl-C: the child has its own session, so nothing else would stop it.
                server._terminate(stop_timeout)
                after_failure()
                # The ports were free when picked, but something else may have taken one since.
                if not isinstance(error, cls.ERROR) or "already in use" not in str(error) or attempt == PORT_ATTEMPTS:
                    raise

    def start_again(self, ready_timeout: float = 30.0) -> None:
        """Start the stopped or killed server again on the same ports, as a restarted container would."""
        if self.running:
            raise self.ERROR(f"{self.NAME} at {self._address} is already running")
        self._launch(ready_timeout)

    def _launch(self, ready_timeout: float) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._log_start = log.seek(0, os.SEEK_END)  # errors quote this run's log only, not earlier ones
            self._proc = subprocess.Popen(
                self._args(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                # Its own process group: its helpers (Triton's backend stubs) go with it on kill, and a
                # Ctrl-C meant for a test runner does not take it down before the fixture's orderly stop.
                start_new_session=True,
            )
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise self.ERROR(f"{self.NAME} exited with code {self._proc.returncode} at startup:\n"
                                 f"{self.log_tail(self.TAIL_LINES)}")
            # OSError: not listening yet, or not ready (an HTTP error status is an HTTPError, an OSError).
            with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(self._ready_url(), timeout=1.0) as r:
                if r.status == 200 and self._healthy(r.read()):
                    return
            if time.monotonic() > deadline:
                raise self.ERROR(f"{self.NAME} at {self._address} not ready after {timeout:.0f} s:\n"
                                 f"{self.log_tail(self.TAIL_LINES)}")
            time.sleep(0.02)

    def _terminate(self, timeout: float) -> None:
        """SIGTERM, SIGKILL if it takes too long, then SIGKILL to whatever is left of its group."""
        proc, self._proc = self._proc, None
        if proc is not None:
            terminate(proc, timeout)
            self._kill_group(proc)  # helpers that outlive the server

    def _kill(self) -> None:
        """SIGKILL to the server and its helpers at once, as a crash would."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._kill_group(proc)

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                text = f.read().decode(errors="replace")
        except OSError:
            return f"(no {self.NAME} log)"
        return "\n".join(text.splitlines()[-lines:])
