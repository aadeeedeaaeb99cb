"""`meshserve node` as a process: connect to etcd, build and start the node, say where it listens, and drain
and stop it on SIGTERM or SIGINT (SIGUSR1 / SIGUSR2: more or less verbose logs)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from meshnode.etcd.store import EtcdAccess, EtcdStore
from meshnode.net.tls import ClientTls
from meshnode.node import READY_LINE, Node
from meshnode.observability import logging as node_logging
from meshnode.settings import NodeSettings

log = logging.getLogger("meshserve.node")


def etcd_access(s: NodeSettings) -> EtcdAccess:
    tls = ClientTls(s.etcd_ca, s.etcd_cert, s.etcd_key) if s.etcd_ca or s.etcd_cert else None
    return EtcdAccess(tuple(s.etcd_endpoints()), tls, s.etcd_user, s.etcd_password_value())


async def run_node(settings: NodeSettings) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGUSR1, node_logging.more_verbose)
    loop.add_signal_handler(signal.SIGUSR2, node_logging.less_verbose)
    node = Node(settings, await EtcdStore.connect(etcd_access(settings), settings.etcd_prefix))
    await node.start()
    metrics = f" metrics={settings.host}:{node.metrics_port}" if node.metrics_port is not None else ""
    peer = f" peer={settings.host}:{node.peer_port}" if node.peer_port is not None else ""
    peer += f" http={settings.host}:{node.http_port}" if node.http_port is not None else ""
    # Launchers (tests, `meshserve local`) read the bound ports from this line.
    print(f"{READY_LINE} grpc={settings.host}:{node.port}{metrics} instance={node.instance_id}{peer}", flush=True)
    await stopping.wait()
    log.info("stopping")
    await node.stop()


def main_node(settings: NodeSettings) -> int:
    node_logging.configure(settings.log_format, logging.INFO, sys.stderr)
    asyncio.run(run_node(settings))
    return 0
