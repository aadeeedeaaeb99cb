"""The CLI's security flags: the node's settings refuse half-given ones; the admin commands send a token
and speak TLS to a node that wants it."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from meshnode.cli.admin import open_channel
from meshnode.cli.main import build_parser, main
from meshnode.local.certs import MeshCerts
from meshnode.net import transport
from meshnode.net.tls import ServerTls
from meshnode.settings import NodeSettings
from meshpb import mpb

BASE = {"etcd": "127.0.0.1:2379", "model_repository": Path("/tmp"), "capacity": "1GiB"}


@pytest.mark.parametrize(("given", "message"), [
    ({"tls_cert": Path("c")}, "--tls-cert and --tls-key go together"),
    ({"tls_client_ca": Path("ca")}, "--tls-client-ca needs --tls-cert"),
    ({"peer_cert": Path("c"), "peer_key": Path("k")}, "all of --peer-cert"),
    ({"require_auth_for_infer": True}, "--auth-tokens"),
    ({"auth_tokens": Path("t")}, "--auth-tokens needs peers to prove"),
    ({"etcd_user": "root"}, "MESHSERVE_ETCD_PASSWORD"),
    ({"etcd": " , "}, "at least one"),
])
def test_half_given_security_settings_are_refused(given: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NodeSettings(**{**BASE, **given})


def test_the_etcd_password_comes_from_a_file_or_the_environment(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHSERVE_ETCD_PASSWORD", "from-env")
    settings = NodeSettings(**{**BASE, "etcd": "a:1,b:2", "etcd_user": "root"})
    assert settings.etcd_password_value() == "from-env" and settings.etcd_endpoints() == ["a:1", "b:2"]
    assert "from-env" not in repr(settings)
    (tmp_path / "pw").write_text("from-file\n")
    assert NodeSettings(**{**BASE, "etcd_user": "root", "etcd_password_file": tmp_path / "pw"}
                        ).etcd_password_value() == "from-file"


def test_no_flag_takes_the_etcd_password_itself() -> None:
    flags = {a for action in build_parser()._subparsers._group_actions[0].choices["node"]._actions  # type: ignore[union-attr]
             for a in action.option_strings}
    assert "--etcd-password-file" in flags and not {f for f in flags if f.startswith("--etcd-password")} - {
        "--etcd-password-file"}


def test_the_node_command_reports_invalid_security_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "--etcd", "a:1", "--model-repository", "/tmp", "--capacity", "1GiB",
                 "--tls-cert", "c"]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err


@pytest.fixture
async def node_port(tmp_path: Path) -> AsyncIterator[tuple[MeshCerts, int, list[tuple[str, str]]]]:
    """A management service over TLS that answers ListNodes and records the metadata it was sent."""
    certs = MeshCerts.generate(tmp_path)
    seen: list[tuple[str, str]] = []

    async def list_nodes(request: mpb.ListNodesRequest, context: Any) -> mpb.ListNodesResponse:
        seen.extend((k, v) for k, v in context.invocation_metadata() if k == "authorization")
        return mpb.ListNodesResponse()

    server = transport.create_server()
    transport.add_management_service(server, {"ListNodes": list_nodes})
    port = transport.bind(server, "127.0.0.1", 0, ServerTls(certs.server.cert, certs.server.key, certs.client_ca))
    await server.start()
    yield certs, port, seen
    await server.stop(None)


def args(port: int, **given: Any) -> argparse.Namespace:
    return argparse.Namespace(target=f"127.0.0.1:{port}", **{"token_file": None, "ca": None, "cert": None,
                                                             "key": None, **given})


async def test_the_admin_commands_send_the_token_over_tls(node_port: tuple[MeshCerts, int, list[tuple[str, str]]],
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    certs, port, seen = node_port
    tls = {"ca": str(certs.client_ca), "cert": str(certs.client.cert), "key": str(certs.client.key)}
    (tmp_path / "token").write_text("from-file\n")
    monkeypatch.setenv("MESHSERVE_TOKEN", "from-env")
    for given in ({}, {"token_file": str(tmp_path / "token")}):
        async with open_channel(args(port, **tls, **given)) as channel:
            await transport.ManagementStub(channel).ListNodes(mpb.ListNodesRequest(), timeout=5)
    assert seen == [("authorization", "Bearer from-env"), ("authorization", "Bearer from-file")]
    # Without a client certificate the node, which requires one, refuses the connection.
    async with open_channel(args(port, ca=tls["ca"])) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await transport.ManagementStub(channel).ListNodes(mpb.ListNodesRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_password_flag_is_refused_not_taken_for_the_password_files(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["node", "--etcd-password", "hunter2"])
    assert "unrecognized arguments: --etcd-password" in capsys.readouterr().err
