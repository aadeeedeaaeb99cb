"""A throw-away single-member etcd server for tests, the bench, the demo and `meshserve local`.

Loopback only, free ports, fast elections (ready in ~0.1 s instead of ~1 s), a log file next to
the data, and stop/start_again on the same ports and data so tests can take etcd away and bring
it back with its contents.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class EtcdTls:
    """etcd's server certificate, and the CA its clients' certificates must come from (--client-cert-auth)."""

    cert: Path
    key: Path
    client_ca: Path


class EtcdProcess(ServerProcess):
    """One etcd server process; `start()` returns it ready to serve client requests."""

    NAME = "etcd"
    ERROR = EtcdProcessError
    TAIL_LINES = 20

    def __init__(self, binary: str, root: Path, owns_root: bool, client_port: int, peer_port: int,
                 health_port: int | None = None, tls: EtcdTls | None = None, host: str = HOST,
                 wrapper: Sequence[str] = ()) -> None:
        super().__init__()
        self._wrapper = list(wrapper)
        self.tls = tls
        self._health_port = health_port  # with TLS: /health in plaintext on a port of its own
        self._binary = binary
        self.data_dir = root
        self._owns_root = owns_root
        self.host = host
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
    def start(cls, data_dir: Path | None = None, ready_timeout: float = 10.0, tls: EtcdTls | None = None,
              host: str = HOST, wrapper: Sequence[str] = ()) -> EtcdProcess:
        """Start etcd on free loopback ports; data_dir (kept on stop) or a temp dir (removed on stop).

        tls: clients connect over TLS and must present a certificate signed by its client_ca.
        host, wrapper: listen there instead, run under the wrapper (`ip netns exec NS`: a host of its own)."""
        binary = _find_binary()
        owns_root = data_dir is None
        root = Path(tempfile.mkdtemp(prefix="meshserve-etcd-")) if data_dir is None else Path(data_dir)
        fresh = not (root / _STORE_NAME).exists()

        def after_failure() -> None:
            if fresh:
                # A half-made store would pin the failed attempt's peer URL into the next one.
                shutil.rmtree(root / _STORE_NAME, ignore_errors=True)

        try:
            def make(p: list[int]) -> EtcdProcess:
                return cls(binary, root, owns_root, p[0], p[1], p[2] if tls else None, tls, host, wrapper)

            return cls._start_on_free_ports(2 if tls is None else 3, make, ready_timeout, stop_timeout=2.0,
                                            after_failure=after_failure)
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

    def enable_auth(self, password: str, timeout_s: float = 10.0) -> None:
        """Add the root user with `password` and turn authentication on (etcdctl, as an operator would)."""
        etcdctl = shutil.which("etcdctl")
        if etcdctl is None:
            raise EtcdProcessError("etcdctl not found on PATH: install the etcd-client package")
        scheme = "https" if self.tls else "http"
        common = [etcdctl, f"--endpoints={scheme}://{self.endpoint}"]
        if self.tls is not None:
            # etcd's own pair is signed by the CA it trusts for clients, as in a mesh run by one CA.
            common += [f"--cacert={self.tls.client_ca}", f"--cert={self.tls.cert}", f"--key={self.tls.key}"]
        for command in (["user", "add", f"root:{password}"], ["auth", "enable"]):
            done = subprocess.run([*common, *command], capture_output=True, text=True, timeout=timeout_s,
                                  env={**self._env(), "ETCDCTL_API": "3"})
            if done.returncode != 0:
                raise EtcdProcessError(f"etcdctl {command[0]} {command[1]} failed: {done.stderr.strip()}")

    def _args(self) -> list[str]:
        scheme = "https" if self.tls else "http"
        client = f"{scheme}://{self.host}:{self.port}"
        peer = f"http://{self.host}:{self._peer_port}"
        secure = [] if self.tls is None else [
            "--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key),
            "--trusted-ca-file", str(self.tls.client_ca), "--client-cert-auth",
            "--listen-metrics-urls", f"http://{self.host}:{self._health_port}"]
        return [
            *self._wrapper, self._binary, *secure,
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
        return f"http://{self.host}:{self._health_port or self.port}/health"

    def _healthy(self, body: bytes) -> bool:
        return bool(json.loads(body).get("health") == "true")  # "false" while there is no leader yet

    def _cleanup(self, keep_data: bool) -> None:
        if self._owns_root and not keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
