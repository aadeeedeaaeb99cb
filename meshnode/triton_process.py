"""A Triton Inference Server child process for tests, the bench and local runs (`make triton` installs it).

The server is the one inside the nvidia-pytriton package, run as ../shared/reference/triton-on-cpu.md
describes: explicit model-control mode, free loopback ports, its own venv's libraries and Python (the
Python backend's stub runs models with the first python on PATH). Like EtcdProcess: a log file, a
readiness wait, stop/kill, and the log's tail in every startup error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from meshnode.errors import MeshServeError

HOST = "127.0.0.1"
HOME_ENV = "MESHSERVE_TRITON_HOME"
# `make triton` puts the venv at the repository's root, next to the meshnode package.
DEFAULT_HOME = Path(__file__).resolve().parents[1] / ".triton-venv"
_PORT_ATTEMPTS = 3
# Triton waits this long for models to unload on SIGTERM; a test's stop should not wait 30 s (its default).
_EXIT_TIMEOUT_S = 5


class TritonProcessError(MeshServeError):
    """The local Triton server could not be found, started or stopped."""


@dataclass(frozen=True, slots=True)
class TritonInstall:
    """What `make triton` made: the venv (home), its copied server tree and its bundled libraries."""

    home: Path
    server: Path  # COPY in the reference: bin/tritonserver, backends/python
    libs: Path  # SITE/nvidia_pytriton.libs

    @classmethod
    def find(cls, home: Path | None = None) -> TritonInstall:
        """From `home`, else $MESHSERVE_TRITON_HOME, else the repository's .triton-venv."""
        root = Path(home or os.environ.get(HOME_ENV) or DEFAULT_HOME)
        server = root / "server"
        libs = sorted(root.glob("lib/python3*/site-packages/nvidia_pytriton.libs"))
        if not (server / "bin" / "tritonserver").is_file() or not libs:
            raise TritonProcessError(f"no Triton install at {root} (set {HOME_ENV} or run `make triton`)")
        return cls(root, server, libs[0])

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.libs), env.get("LD_LIBRARY_PATH")]))
        env["PATH"] = os.pathsep.join(filter(None, [str(self.home / "bin"), env.get("PATH")]))
        # The main venv's variables would point the stub's Python at numpy 2, which breaks the backend.
        for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            env.pop(name, None)
        return env


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


class TritonProcess:
    """One tritonserver; `start()` returns it ready to serve. Models load only when asked (explicit mode)."""

    def __init__(self, install: TritonInstall, repository: Path, work: Path, ports: list[int]) -> None:
        self.install = install
        self.model_repository = repository
        self._work = work  # the log, and the model repository when none was given
        self.http_port, self.grpc_port, self.metrics_port = ports
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    @property
    def grpc_target(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self._work / "tritonserver.log"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise TritonProcessError("Triton is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @classmethod
    def start(cls, model_repository: Path | None = None, *, home: Path | None = None,
              ready_timeout: float = 30.0) -> TritonProcess:
        """Start on free loopback ports; `model_repository` (kept) or an empty temp dir (removed on stop)."""
        install = TritonInstall.find(home)
        work = Path(tempfile.mkdtemp(prefix="meshserve-triton-"))
        repository = work / "models" if model_repository is None else Path(model_repository).resolve()
        repository.mkdir(parents=True, exist_ok=True)
        last_error: TritonProcessError | None = None
        for _ in range(_PORT_ATTEMPTS):
            triton = cls(install, repository, work, _free_ports(3))
            try:
                triton._launch(ready_timeout)
                return triton
            except TritonProcessError as error:
                triton._terminate(timeout=5.0)
                last_error = error
                # The ports were free when picked; something else may have taken one since.
                if "already in use" not in str(error):
                    break
        shutil.rmtree(work, ignore_errors=True)
        assert last_error is not None
        raise last_error

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Triton unloads its models), SIGKILL to the whole group if it takes too long."""
        self._terminate(timeout)
        shutil.rmtree(self._work, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL to Triton and its backend stubs at once, as a crash would; the files stay."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._kill_group(proc)

    def __enter__(self) -> TritonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _args(self) -> list[str]:
        server = self.install.server
        return [
            str(server / "bin" / "tritonserver"),
            "--model-repository", str(self.model_repository),
            "--model-control-mode=explicit",
            "--backend-directory", str(server / "backends"),
            "--cache-directory", str(server / "caches"),
            "--http-address", HOST, "--http-port", str(self.http_port),
            "--grpc-address", HOST, "--grpc-port", str(self.grpc_port),
            "--metrics-address", HOST, "--metrics-port", str(self.metrics_port),
            "--allow-gpu-metrics", "false",
            "--exit-timeout-secs", str(_EXIT_TIMEOUT_S),
        ]  # fmt: skip

    def _launch(self, ready_timeout: float) -> None:
        with open(self.log_path, "ab") as log:
            self._log_start = log.seek(0, os.SEEK_END)  # errors quote this attempt's log only
            self._proc = subprocess.Popen(
                self._args(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.install.environment(),
                # Its own process group: its stubs go with it on kill, and a Ctrl-C meant for a test
                # runner does not take it down before the fixture's orderly stop.
                start_new_session=True,
            )
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{HOST}:{self.http_port}/v2/health/ready"
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise TritonProcessError(
                    f"tritonserver exited with code {self._proc.returncode} at startup:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass  # not listening yet, or not ready (HTTP 400 is an HTTPError, an OSError)
            if time.monotonic() > deadline:
                raise TritonProcessError(
                    f"tritonserver at {self.grpc_target} not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def _terminate(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self._kill_group(proc)  # stubs that outlive the server, or a server that would not stop

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
            return "(no tritonserver log)"
        return "\n".join(text.splitlines()[-lines:])
