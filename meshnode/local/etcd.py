"""A throw-away single-member etcd server for tests, the bench, the demo and `meshserve local`.

Loopback only, free ports, fast elections (ready in ~0.1 s instead of ~1 s), a log file next to
the data, and stop/start_again on the same ports and data so tests can take etcd away and bring
it back with its contents.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from meshnode.local.process import HOST, LaunchError, ServerProcess

_LOG_NAME = "etcd.log"
# etcd warns about any foreign file in its data dir, so the log sits beside it, not inside.
_STORE_NAME = "data"


class EtcdProcessError(LaunchError):
    """The local etcd server could not be found, started or stopped."""


def _find_binary() -> str:
    path = shutil.which("etcd")
    if path is None:
        raise EtcdProcessError("etcd server binary not found on PATH: run `make install`")
    return path


class EtcdProcess(ServerProcess):
    """One etcd server process; `start()` returns it ready to serve client requests."""

    NAME = "etcd"
    ERROR = EtcdProcessError
    TAIL_LINES = 20

    def __init__(self, binary: str, root: Path, owns_root: bool, client_port: int, peer_port: int) -> None:
        super().__init__()
        self._binary = binary
        self.data_dir = root
        self._owns_root = owns_root
        self.host = HOST
        self.port = client_port
        self._peer_port = peer_port

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / _LOG_NAME

    @property
    def _address(self) -> str:
        return self.endpoint

    @classmethod
    def start(cls, data_dir: Path | None = None, ready_timeout: float = 10.0) -> EtcdProcess:
        """Start etcd on free loopback ports; data_dir (kept on stop) or a temp dir (removed on stop)."""
        binary = _find_binary()
        owns_root = data_dir is None
        root = Path(tempfile.mkdtemp(prefix="meshserve-etcd-")) if data_dir is None else Path(data_dir)
        fresh = not (root / _STORE_NAME).exists()

        def after_failure() -> None:
            if fresh:
                # A half-made store would pin the failed attempt's peer URL into the next one.
                shutil.rmtree(root / _STORE_NAME, ignore_errors=True)

        try:
            return cls._start_on_free_ports(2, lambda ports: cls(binary, root, owns_root, *ports), ready_timeout,
                                            stop_timeout=2.0, after_failure=after_failure)
        except BaseException:
            if owns_root:
                shutil.rmtree(root, ignore_errors=True)
            raise

    # start_again (ServerProcess): after stop(keep_data=True) etcd comes back with its data; after a plain
    # stop() of a temp data dir it comes back empty, which is how tests make etcd lose its data.

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
        self._kill()
        self._cleanup(keep_data)

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

    def _env(self) -> dict[str, str]:
        # ETCD_* variables from the caller's shell would silently reconfigure the throw-away server.
        return {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}

    def _ready_url(self) -> str:
        return f"http://{self.endpoint}/health"

    def _healthy(self, body: bytes) -> bool:
        return bool(json.loads(body).get("health") == "true")  # "false" while there is no leader yet

    def _cleanup(self, keep_data: bool) -> None:
        if self._owns_root and not keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
