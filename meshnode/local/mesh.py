"""`meshserve local`: an etcd and N nodes on loopback for development, the demo and the tests."""

from __future__ import annotations

import secrets
import signal
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import TypedDict

from meshnode.local.certs import MeshCerts
from meshnode.local.etcd import EtcdProcess, EtcdTls
from meshnode.local.node import NodeProcess
from meshnode.local.triton import TritonProcess


class _StartArgs(TypedDict):
    """NodeProcess.start's arguments that every node of the mesh shares."""

    etcd: str
    model_repository: Path
    capacity: str
    etcd_prefix: str


class LocalMesh:
    def __init__(self, etcd: EtcdProcess, nodes: list[NodeProcess], log_dir: Path, start_args: _StartArgs,
                 node_args: list[list[str]], tritons: list[TritonProcess], certs: MeshCerts | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.etcd = etcd
        self.certs = certs  # with tls: the CAs and certificates, for clients
        self._env = env
        self.nodes = nodes
        self.log_dir = log_dir
        self.tritons = tritons  # with --runtime triton: node i's Triton
        self._start_args = start_args
        self._node_args = node_args

    @classmethod
    def start(
        cls, *, nodes: int, model_repository: Path, capacity: str = "1GiB", first_port: int = 0,
        first_metrics_port: int | None = 0, log_dir: Path | None = None, etcd_prefix: str = "meshserve",
        extra_args: list[str] | None = None, triton: bool = False, tls: bool = False,
        require_client_certs: bool = False,
    ) -> LocalMesh:
        """Ports count up from first_port (0: any free ones); each node is named node-<i>.

        triton: each node runs beside a Triton server of its own (meshnode.local.triton) on the same
        model repository, as `--runtime triton`.
        tls: throwaway certificates (meshnode.local.certs): mutual TLS between peers, TLS on the client ports
        (client certificates required with require_client_certs), etcd over mutual TLS with auth enabled.
        """
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="meshserve-local-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        certs = MeshCerts.generate(log_dir / "certs") if tls else None
        env = None
        if certs is not None:
            etcd = EtcdProcess.start(tls=EtcdTls(certs.etcd.cert, certs.etcd.key, certs.mesh_ca))
            password = secrets.token_urlsafe(16)
            try:
                etcd.enable_auth(password)
            except BaseException:
                etcd.stop()
                raise
            env = {"MESHSERVE_ETCD_PASSWORD": password}
            extra_args = [*certs.node_args(require_client_certs), "--etcd-user", "root", *(extra_args or [])]
        else:
            etcd = EtcdProcess.start()
        common: _StartArgs = {"etcd": etcd.endpoint, "model_repository": model_repository, "capacity": capacity,
                              "etcd_prefix": etcd_prefix}
        started: list[NodeProcess] = []
        tritons: list[TritonProcess] = []
        node_args: list[list[str]] = []
        try:
            for i in range(nodes):
                node_args.append(list(extra_args or []))
                if triton:
                    tritons.append(TritonProcess.start(model_repository))
                    node_args[i] += ["--runtime", "triton", "--triton-url", tritons[i].grpc_target,
                                     "--triton-model-repository", str(model_repository)]
                started.append(NodeProcess.start(
                    **common, extra_args=node_args[i], port=first_port + i if first_port else 0,
                    metrics_port=(first_metrics_port + i if first_metrics_port else first_metrics_port),
                    instance_id=f"node-{i}", log_file=log_dir / f"node-{i}.log", env=env,
                ))
        except BaseException:
            for node in started:
                node.stop()
            for server in tritons:
                server.stop()
            etcd.stop()
            raise
        return cls(etcd, started, log_dir, common, node_args, tritons, certs, env)

    def restart(self, i: int) -> NodeProcess:
        """Stop node i gracefully (it drains) and start it again with the same id and ports."""
        self.nodes[i].stop(timeout_s=90.0)
        return self.start_again(i)

    def start_again(self, i: int) -> NodeProcess:
        """Start node i, stopped or killed, again with the same id and ports, as a restarted pod would."""
        old = self.nodes[i]
        self.nodes[i] = NodeProcess.start(
            **self._start_args, extra_args=self._node_args[i], port=old.port, metrics_port=old.metrics_port,
            instance_id=old.instance_id, log_file=self.log_dir / f"{old.instance_id}.log", env=self._env,
        )
        return self.nodes[i]

    def targets(self) -> list[str]:
        return [node.target for node in self.nodes]

    def describe(self) -> str:
        lines = [f"etcd      {self.etcd.endpoint}"]
        for node in self.nodes:
            metrics = f"  metrics http://127.0.0.1:{node.metrics_port}/metrics" if node.metrics_port else ""
            lines.append(f"{node.instance_id:<9} {node.target}{metrics}")
        for i, server in enumerate(self.tritons):
            lines.append(f"triton-{i:<2} {server.grpc_target}  (node-{i}'s runtime)")
        if self.certs is not None:
            c = self.certs
            lines.append(f"tls       clients: --ca {c.client_ca} (--cert {c.client.cert} --key {c.client.key}); "
                         f"peers: mutual TLS with {c.mesh_ca}")
        lines.append(f"logs      {self.log_dir}")
        return "\n".join(lines)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        for server in self.tritons:
            server.stop()
        self.etcd.stop()

    def __enter__(self) -> LocalMesh:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def run_local(nodes: int, model_repository: Path, port: int, capacity: str, triton: bool = False,
              tls: bool = False) -> int:
    """Start the mesh, print where it is, and stop it all on Ctrl-C or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalMesh.start(nodes=nodes, model_repository=model_repository, capacity=capacity, first_port=port,
                         first_metrics_port=2112, triton=triton, tls=tls) as mesh:
        print(f"meshserve local: {nodes} nodes on loopback, models from {model_repository}")
        print(mesh.describe())
        print("Ctrl-C stops them all.", flush=True)
        stop.wait()
        print("stopping ...", flush=True)
    return 0
