"""A throw-away single-member etcd server for tests, the bench, the demo and `meshserve local`.

Loopback only, free ports, fast elections (ready in ~0.1 s instead of ~1 s), a log file next to
the data, and stop/start_again on the same ports and data so tests can take etcd away and bring
it back with its contents.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from meshnode.errors import MeshServeError

HOST = "127.0.0.1"
_LOG_NAME = "etcd.log"
# etcd warns about any foreign file in its data dir, so the log sits beside it, not inside.
_STORE_NAME = "data"
_PORT_ATTEMPTS = 3


class EtcdProcessError(MeshServeError):
    """The local etcd server could not be found, started or stopped."""


def _free_ports(n: int) -> list[int]:
    # All held open together so the kernel cannot hand out the same port twice.
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _find_binary() -> str:
    path = shutil.which("etcd")
    if path is None:
        raise EtcdProcessError("etcd server binary not found on PATH: run `make install`")
    return path


class EtcdProcess:
    """One etcd server process; `start()` returns it ready to serve client requests."""

    def __init__(self, binary: str, root: Path, owns_root: bool, client_port: int, peer_port: int) -> None:
        self._binary = binary
        self.data_dir = root
        self._owns_root = owns_root
        self.host = HOST
        self.port = client_port
        self._peer_port = peer_port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / _LOG_NAME

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @classmethod
    def start(cls, data_dir: Path | None = None, ready_timeout: float = 10.0) -> EtcdProcess:
        """Start etcd on free loopback ports; data_dir (kept on stop) or a temp dir (removed on stop)."""
        binary = _find_binary()
        owns_root = data_dir is None
        root = Path(tempfile.mkdtemp(prefix="meshserve-etcd-")) if data_dir is None else Path(data_dir)
        fresh = not (root / _STORE_NAME).exists()
        last_error: EtcdProcessError | None = None
        for _ in range(_PORT_ATTEMPTS):
            etcd = cls(binary, root, owns_root, *_free_ports(2))
            try:
                etcd._launch(ready_timeout)
                return etcd
            except EtcdProcessError as e:
                etcd._terminate(timeout=2.0)
                last_error = e
                if fresh:
                    # A half-made store would pin the failed attempt's peer URL into the next one.
                    shutil.rmtree(root / _STORE_NAME, ignore_errors=True)
                # The ports were free when picked but something else may have taken them since.
                if "address already in use" not in str(e):
                    break
        if owns_root:
            shutil.rmtree(root, ignore_errors=True)
        assert last_error is not None
        raise last_error

    def start_again(self, ready_timeout: float = 10.0) -> None:
        """Start the stopped server on the same ports and data directory.

        After stop(keep_data=True) etcd comes back with its data; after a plain stop() of a temp
        data dir it comes back empty, which is how tests make etcd lose its data.
        """
        if self.running:
            raise EtcdProcessError(f"etcd at {self.endpoint} is already running")
        self._launch(ready_timeout)

    def restart_after(self, seconds: float, ready_timeout: float = 10.0) -> None:
        """Stop, stay down for `seconds`, start again with the same data; blocking (use to_thread)."""
        self.stop(keep_data=True)
        time.sleep(seconds)
        self.start_again(ready_timeout)

    def stop(self, timeout: float = 5.0, keep_data: bool = False) -> None:
        """SIGTERM, SIGKILL if still alive after `timeout`; remove a temp data dir unless keep_data."""
        self._terminate(timeout)
        self._cleanup(keep_data)

    def kill(self, keep_data: bool = False) -> None:
        """SIGKILL at once, as a crash would."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None
        self._cleanup(keep_data)

    def __enter__(self) -> EtcdProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _args(self) -> list[str]:
        client = f"http://{self.host}:{self.port}"
        peer = f"http://{self.host}:{self._peer_port}"
        return [
            self._binary,
            "--name", "meshserve",
            "--data-dir", str(self.data_dir / _STORE_NAME),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"meshserve={peer}",
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip

    def _launch(self, ready_timeout: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # ETCD_* variables from the caller's shell would silently reconfigure the throw-away server.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        with open(self.log_path, "ab") as log:
            # Errors quote this run's log only, not earlier runs appended to the same file.
            self._log_start = log.seek(0, os.SEEK_END)
            self._proc = subprocess.Popen(
                self._args(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own process group: a Ctrl-C meant for the test runner must not kill etcd
                # before the fixture's orderly stop.
                start_new_session=True,
            )
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.endpoint}/health"
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise EtcdProcessError(f"etcd exited with code {self._proc.returncode} at startup:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass  # not listening yet, or no leader yet
            if time.monotonic() > deadline:
                raise EtcdProcessError(f"etcd at {self.endpoint} not ready after {timeout:.0f} s:\n{self._log_tail()}")
            time.sleep(0.02)

    def _terminate(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _cleanup(self, keep_data: bool) -> None:
        if self._owns_root and not keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no etcd log)"
        return "\n".join(text.splitlines()[-lines:])
