"""A multi-host mesh on one machine: etcd, an S3-compatible store and N nodes, each on a host of its own.

Hosts are network namespaces on a bridge (deploy.local.netns): every node has its own address, its own disk
directory (its --disk-cache; no path is shared) and reads models only from the store (moto's S3 server) on
another host; etcd runs on a third. Peers talk mutual TLS, clients TLS, etcd mutual TLS, on certificates
that name every host's address. Ports are the defaults on every host: each namespace has its own.

    sudo .venv/bin/python -m deploy.local.hosts --nodes 3 --models DIR    # Ctrl-C stops and removes it all
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3

from deploy.local.netns import Host, Network
from meshnode.local.certs import MeshCerts
from meshnode.local.etcd import EtcdProcess, EtcdTls
from meshnode.local.node import NodeProcess
from meshnode.local.process import LaunchError, ServerProcess
from meshnode.net.tls import ClientTls

BUCKET = "models"
REPOSITORY = f"s3://{BUCKET}/models"
REGION = "us-east-1"
STORE_PORT = 9000
NODE_PORT, PEER_PORT, METRICS_PORT = 8033, 8034, 2112
# moto takes any key; the nodes still sign their requests with one, as against a real store.
_KEYS = {"AWS_ACCESS_KEY_ID": "meshserve", "AWS_SECRET_ACCESS_KEY": "meshserve"}


class MotoServer(ServerProcess):
    """moto's S3-compatible server on a host of its own (in memory: it comes back empty after a stop)."""

    NAME = "moto_server"
    ERROR = LaunchError

    def __init__(self, host: Host, work: Path) -> None:
        super().__init__()
        self._host = host
        self._work = work
        self.endpoint = f"http://{host.address}:{STORE_PORT}"

    @classmethod
    def start(cls, host: Host, work: Path) -> MotoServer:
        server = cls(host, work)
        server._launch(ready_timeout=30.0)  # on failure _launch has stopped the child already
        return server

    @property
    def log_path(self) -> Path:
        return self._work / "moto.log"

    @property
    def _address(self) -> str:
        return self.endpoint

    def _args(self) -> list[str]:
        binary = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        return [*self._host.wrap(), binary, "-H", self._host.address, "-p", str(STORE_PORT)]

    def _env(self) -> dict[str, str]:
        return {**os.environ, **_KEYS}

    def _ready_url(self) -> str:
        return f"{self.endpoint}/moto-api/data.json"

    def stop(self, timeout: float = 10.0) -> None:
        self._terminate(timeout)

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=_KEYS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=_KEYS["AWS_SECRET_ACCESS_KEY"])

    def upload(self, repository: Path) -> None:
        """Every file of a Triton-layout directory under the mesh's repository prefix."""
        s3 = self.client()
        s3.create_bucket(Bucket=BUCKET)
        for path in sorted(p for p in repository.rglob("*") if p.is_file()):
            s3.put_object(Bucket=BUCKET, Key=f"models/{path.relative_to(repository).as_posix()}",
                          Body=path.read_bytes())


def _node_args(host: Host, etcd: EtcdProcess, store: MotoServer, certs: MeshCerts, work: Path, capacity: str,
               prefix: str, extra_args: list[str]) -> dict[str, Any]:
    """NodeProcess.start's arguments for the node on `host`: its address, its disk directory, TLS, the store."""
    return dict(etcd=etcd.endpoint, model_repository=REPOSITORY, capacity=capacity, etcd_prefix=prefix,
                port=NODE_PORT, metrics_port=METRICS_PORT, instance_id=host.name, host=host.address,
                wrapper=host.wrap(), env=_KEYS, log_file=work / f"{host.name}.log",
                extra_args=[*certs.node_args(), "--peer-port", str(PEER_PORT), "--disk-cache",
                            str(work / host.name / "disk"), "--s3-endpoint-url", store.endpoint, "--s3-region", REGION,
                            "--repository-poll-interval", "1", *extra_args])


class HostsMesh:
    def __init__(self, network: Network, work: Path, certs: MeshCerts, etcd: EtcdProcess, store: MotoServer,
                 node_args: list[dict[str, Any]], owns_work: bool) -> None:
        self.network = network
        self.work = work
        self.certs = certs
        self.etcd = etcd
        self.store = store
        self._node_args = node_args  # NodeProcess.start's arguments, per node: a restart reuses them
        self._owns_work = owns_work
        self.nodes: list[NodeProcess | None] = [None] * len(node_args)

    @classmethod
    def start(cls, *, nodes: int, models: Path, capacity: str = "256MiB", work: Path | None = None,
              extra_args: list[str] | None = None) -> HostsMesh:
        """The hosts, etcd, the store holding `models` (a Triton-layout directory), then the nodes."""
        names = ["etcd", "store", *(f"node-{i}" for i in range(nodes))]
        owns_work = work is None
        work = Path(tempfile.mkdtemp(prefix="meshserve-hosts-")) if work is None else work
        with contextlib.ExitStack() as undo:  # on any failure, what started stops, in reverse order
            if owns_work:
                undo.callback(shutil.rmtree, work, ignore_errors=True)
            network = Network.create(names)
            undo.callback(network.close)
            addresses = tuple(host.address for host in network.hosts.values())
            certs = MeshCerts.generate(work / "certs", ("127.0.0.1", "localhost", *addresses))
            etcd_host = network.hosts["etcd"]
            etcd = EtcdProcess.start(work / "etcd", tls=EtcdTls(certs.etcd.cert, certs.etcd.key, certs.mesh_ca),
                                     host=etcd_host.address, wrapper=etcd_host.wrap())
            undo.callback(etcd.stop)
            store = MotoServer.start(network.hosts["store"], work)
            undo.callback(store.stop)
            store.upload(models)
            prefix = f"hosts-{uuid.uuid4().hex[:8]}"
            node_args = [_node_args(network.hosts[f"node-{i}"], etcd, store, certs, work, capacity, prefix,
                                    extra_args or []) for i in range(nodes)]
            mesh = cls(network, work, certs, etcd, store, node_args, owns_work)
            undo.callback(mesh.stop_nodes)
            for i in range(nodes):
                mesh.start_node(i)
            undo.pop_all()
        return mesh

    @property
    def client_tls(self) -> ClientTls:
        return ClientTls(self.certs.client_ca)

    def node(self, i: int) -> NodeProcess:
        node = self.nodes[i]
        if node is None:
            raise LaunchError(f"node-{i} is not running")
        return node

    def targets(self) -> list[str]:
        return [f"{self.network.hosts[f'node-{i}'].address}:{NODE_PORT}" for i in range(len(self.nodes))]

    def start_node(self, i: int) -> NodeProcess:
        """Start node i (again): same host, address, ports and disk directory, as a restarted machine."""
        self.nodes[i] = NodeProcess.start(**self._node_args[i])
        return self.nodes[i]  # type: ignore[return-value]

    def restart(self, i: int) -> NodeProcess:
        """Stop node i gracefully (it drains, hands its models over) and start it again."""
        self.node(i).stop(timeout_s=90.0)
        self.nodes[i] = None
        return self.start_node(i)

    def cut(self, i: int) -> None:
        self.network.cut(f"node-{i}")

    def reconnect(self, i: int) -> None:
        self.network.reconnect(f"node-{i}")

    def cut_from_etcd(self, i: int) -> None:
        """Node i loses etcd only: clients, peers and the store still reach it."""
        self.network.block(f"node-{i}", self.network.hosts["etcd"].address)

    def reconnect_to_etcd(self, i: int) -> None:
        self.network.unblock(f"node-{i}")

    def describe(self) -> str:
        lines = [f"etcd      {self.etcd.endpoint} (mutual TLS)", f"store     {self.store.endpoint}  {REPOSITORY}"]
        for i, target in enumerate(self.targets()):
            lines.append(f"node-{i:<4} {target}  peers :{PEER_PORT}  metrics :{METRICS_PORT}  "
                         f"netns {self.network.hosts[f'node-{i}'].namespace}")
        lines.append(f"clients   --ca {self.certs.client_ca}")
        lines.append(f"work      {self.work}")
        return "\n".join(lines)

    def stop_nodes(self) -> None:
        """Every node at once (each drains, as a whole deployment deleted at once would)."""
        running = [node for node in self.nodes if node is not None]
        with ThreadPoolExecutor(max(1, len(running))) as pool:
            list(pool.map(NodeProcess.stop, running))
        self.nodes = [None] * len(self.nodes)

    def stop(self) -> None:
        """Every process, then every namespace and link; each step runs even if one before it failed."""
        with contextlib.ExitStack() as steps:
            if self._owns_work:
                steps.callback(shutil.rmtree, self.work, ignore_errors=True)
            steps.callback(self.network.close)
            steps.callback(self.etcd.stop)
            steps.callback(self.store.stop)
            steps.callback(self.stop_nodes)

    def __enter__(self) -> HostsMesh:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.hosts", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--models", type=Path, required=True, help="a Triton-layout directory, put in the store")
    parser.add_argument("--capacity", default="256MiB")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with HostsMesh.start(nodes=args.nodes, models=args.models, capacity=args.capacity) as mesh:
        print(mesh.describe(), flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
