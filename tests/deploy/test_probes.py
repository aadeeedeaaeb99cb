"""The health checks as shipped ask a real node: the image's HEALTHCHECK on the plaintext port, and the
in-pod probe of the tls component over TLS (the kubelet's own gRPC probe cannot speak TLS). Each passes
while the node serves and fails once it is gone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from tests.deploy.manifests import DOCKERFILE, Obj, node_container

TLS_MOUNT = "/etc/meshserve/tls"
IMAGE_PORT = "127.0.0.1:8033"  # where the in-pod probe asks: the node's port in the manifests


def probe(command: list[str], env: dict[str, str] | None = None) -> int:
    assert command[0] == "python"
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode


@pytest.fixture
def node(etcd: EtcdProcess, etcd_prefix: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NodeProcess]:
    (tmp_path / "models").mkdir()
    started = NodeProcess.start(etcd=etcd.endpoint, etcd_prefix=etcd_prefix, model_repository=tmp_path / "models",
                                capacity="64MiB", metrics_port=None, extra_args=request.param(tmp_path))
    try:
        yield started
    finally:
        started.stop()


def _plaintext(tmp_path: Path) -> list[str]:
    return []


def _tls(tmp_path: Path) -> list[str]:
    """A certificate under the name the probe checks (the client port's Certificate names it too)."""
    issued = trustme.CA()
    issued.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    cert = issued.issue_cert("meshserve")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    return ["--tls-cert", str(tmp_path / "tls.crt"), "--tls-key", str(tmp_path / "tls.key")]


@pytest.mark.parametrize("node", [_plaintext], indirect=True)
def test_the_image_healthcheck_asks_the_health_service(node: NodeProcess) -> None:
    command = json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[[^\n]*\])$", DOCKERFILE.read_text(), re.M | re.S)[1])
    env = {"MESHSERVE_PORT": str(node.port)}
    assert probe(command, env) == 0
    node.stop()
    assert probe(command, env) != 0


@pytest.mark.parametrize("node", [_tls], indirect=True)
def test_the_tls_probe_asks_the_health_service(node: NodeProcess, manifests: dict[str, list[Obj]],
                                               tmp_path: Path) -> None:
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = node_container(manifests["cert-manager"])[name]["exec"]["command"]
        local = [word.replace(TLS_MOUNT, str(tmp_path)).replace(IMAGE_PORT, node.target) for word in command]
        assert local != command and probe(local) == 0, name
    node.stop()
    assert probe(local) != 0
