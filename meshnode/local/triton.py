"""A Triton Inference Server child process for tests, the bench and local runs (`make triton` installs it).

The server is the one inside the nvidia-pytriton package, run as ../shared/reference/triton-on-cpu.md
describes: explicit model-control mode, free loopback ports, its own venv's libraries and Python (the
Python backend's stub runs models with the first python on PATH). The log file, readiness wait, stop/kill
and the log's tail in every startup error are meshnode.local.process's, as for EtcdProcess.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from meshnode.local.process import HOST, LaunchError, ServerProcess

HOME_ENV = "MESHSERVE_TRITON_HOME"
# `make triton` puts the venv at the repository's root, next to the meshnode package.
DEFAULT_HOME = Path(__file__).resolve().parents[2] / ".triton-venv"
# Triton waits this long for models to unload on SIGTERM; a test's stop should not wait 30 s (its default).
_EXIT_TIMEOUT_S = 5


class TritonProcessError(LaunchError):
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


class TritonProcess(ServerProcess):
    """One tritonserver; `start()` returns it ready to serve. Models load only when asked (explicit mode)."""

    NAME = "tritonserver"
    ERROR = TritonProcessError

    def __init__(self, install: TritonInstall, repository: Path, work: Path, ports: list[int]) -> None:
        super().__init__()
        self.install = install
        self.model_repository = repository
        self._work = work  # the log, and the model repository when none was given
        self.http_port, self.grpc_port, self.metrics_port = ports

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
    def _address(self) -> str:
        return self.grpc_target

    @classmethod
    def start(cls, model_repository: Path | None = None, *, home: Path | None = None,
              ready_timeout: float = 30.0) -> TritonProcess:
        """Start on free loopback ports; `model_repository` (kept) or an empty temp dir (removed on stop)."""
        install = TritonInstall.find(home)
        work = Path(tempfile.mkdtemp(prefix="meshserve-triton-"))
        repository = work / "models" if model_repository is None else Path(model_repository).resolve()
        repository.mkdir(parents=True, exist_ok=True)
        try:
            return cls._start_on_free_ports(3, lambda ports: cls(install, repository, work, ports), ready_timeout,
                                            stop_timeout=5.0)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Triton unloads its models), SIGKILL to the whole group if it takes too long."""
        self._terminate(timeout)
        shutil.rmtree(self._work, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL to Triton and its backend stubs at once, as a crash would; the files stay."""
        self._kill()

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

    def _env(self) -> dict[str, str]:
        return self.install.environment()

    def _ready_url(self) -> str:
        return f"http://{HOST}:{self.http_port}/v2/health/ready"
