"""A mesh that lets no one in where they don't belong: three nodes with mutual TLS between peers, TLS with client
certificates on the client ports, etcd over mutual TLS with auth enabled, roles on management (one mesh for
the module)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
import trustme
from cryptography import x509
from tritonclient.utils import InferenceServerException

from deploy.local.models import mlp_reference, write_mlp
from meshnode.local.certs import MeshCerts, Pair
from meshnode.local.mesh import LocalMesh
from meshnode.net import transport
from meshnode.net.tls import ClientTls
from meshpb import mpb, pb
from tests.integration.helpers import metric, wait_until

MODELS = ("m0", "m1", "m2")
ADMIN, READER = "admin-token-7f3a9c", "reader-token-51be02"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tls-repo")
    for i, name in enumerate((*MODELS, "cold", "spare")):
        write_mlp(root, name, approx_bytes=100_000, seed=i)
    return root


@pytest.fixture(scope="module")
def mesh(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    logs = tmp_path_factory.mktemp("tls-mesh")
    tokens = logs / "tokens"
    tokens.write_text(f"# token role\n{ADMIN} admin\n{READER} reader\ncert:ops-reader reader\n")
    with LocalMesh.start(nodes=3, model_repository=repo, capacity="64MiB", log_dir=logs, tls=True,
                         require_client_certs=True,
                         extra_args=["--no-proactive-loads", "--auth-tokens", str(tokens)]) as started:
        yield started


def certs(mesh: LocalMesh) -> MeshCerts:
    assert mesh.certs is not None
    return mesh.certs


def client(mesh: LocalMesh, target: str, pair: Pair | None = None) -> aioclient.InferenceServerClient:
    c = certs(mesh)
    pair = pair or c.client
    return aioclient.InferenceServerClient(target, ssl=True, root_certificates=str(c.client_ca),
                                           private_key=str(pair.key), certificate_chain=str(pair.cert))


def x_input(x: np.ndarray) -> list[aioclient.InferInput]:
    inp = aioclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def total(mesh: LocalMesh, name: str) -> float:
    return sum(metric(node, name) for node in mesh.nodes)


async def manage(mesh: LocalMesh, method: str, request: object, token: str | None = None,
                 pair: Pair | None = None) -> Any:
    c = certs(mesh)
    pair = pair or c.client
    entries = (("authorization", f"Bearer {token}"),) if token else ()
    async with transport.create_channel(mesh.targets()[0], ClientTls(c.client_ca, pair.cert, pair.key),
                                        (lambda: entries) if entries else None) as channel:
        return await getattr(transport.ManagementStub(channel), method)(request, timeout=30)


async def test_every_model_through_every_node_over_tls(mesh: LocalMesh, repo: Path) -> None:
    x = np.random.default_rng(5).standard_normal((2, 16), dtype=np.float32)
    for target in mesh.targets():
        async with client(mesh, target) as c:
            for name in MODELS:
                out = (await c.infer(name, x_input(x))).as_numpy("OUTPUT0")
                np.testing.assert_allclose(out, mlp_reference(repo / name, x), rtol=1e-4, atol=1e-5)
    # One load per model: the other nodes forwarded to its copy over the peers' mutual TLS.
    assert total(mesh, "modelmesh_loadmodel_total") == len(MODELS)
    nodes = (await manage(mesh, "ListNodes", mpb.ListNodesRequest(), READER)).nodes
    assert sorted(n.endpoint for n in nodes) == sorted(f"127.0.0.1:{n.peer_port}" for n in mesh.nodes)


async def test_a_client_without_a_certificate_or_with_a_foreign_one_is_refused(mesh: LocalMesh,
                                                                               tmp_path: Path) -> None:
    c = certs(mesh)
    foreign = trustme.CA().issue_cert("meshserve-client")
    foreign.private_key_pem.write_to_path(str(tmp_path / "k"))
    foreign.cert_chain_pems[0].write_to_path(str(tmp_path / "c"))
    attempts = [aioclient.InferenceServerClient(mesh.targets()[0], ssl=True, root_certificates=str(c.client_ca)),
                client(mesh, mesh.targets()[0], Pair(tmp_path / "c", tmp_path / "k")),
                aioclient.InferenceServerClient(mesh.targets()[0])]  # plaintext
    for attempt in attempts:
        async with attempt:
            with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
                await attempt.is_server_live(client_timeout=5)


@pytest.mark.parametrize("who", ["another CA", "the client CA"])
async def test_a_peer_port_refuses_certificates_the_mesh_ca_did_not_sign(mesh: LocalMesh, tmp_path: Path,
                                                                          who: str) -> None:
    c = certs(mesh)
    if who == "another CA":
        issued = trustme.CA().issue_cert("meshserve-node", "127.0.0.1")
        pair = Pair(tmp_path / "c", tmp_path / "k")
        issued.private_key_pem.write_to_path(str(pair.key))
        issued.cert_chain_pems[0].write_to_path(str(pair.cert))
    else:
        pair = c.client  # a client's certificate must never pass for a mesh member's
    peer = f"127.0.0.1:{mesh.nodes[0].peer_port}"
    async with transport.create_channel(peer, ClientTls(c.mesh_ca, pair.cert, pair.key)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await transport.InferenceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    async with transport.create_channel(peer, ClientTls(c.mesh_ca, c.peer.cert, c.peer.key)) as channel:
        assert (await transport.InferenceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=5)).ready


async def test_a_forged_hop_from_a_client_is_stripped_and_counted(mesh: LocalMesh) -> None:
    node = mesh.nodes[0]
    before = metric(node, "meshserve_hops_stripped_total")
    x = np.ones((1, 16), np.float32)
    async with client(mesh, node.target) as c:
        # Honoured, "copy" would answer NotHere (no copy of "cold" anywhere yet) and "load-last" would load
        # here whatever it evicts; stripped, both route as fresh client requests and are answered.
        for forged in ("0|copy|", "0|load-last|"):
            await c.infer("cold", x_input(x), parameters={"meshserve_hop": forged})
        await c.infer("cold", x_input(x), headers={"meshserve-mode": "load-last", "meshserve-hops": "0"})
    assert metric(node, "meshserve_hops_stripped_total") == before + 3


async def test_management_needs_a_token_and_the_role(mesh: LocalMesh, repo: Path) -> None:
    register = mpb.RegisterModelRequest(name="spare", storage_uri=str(repo / "spare"), lazy=True)
    for token, method, request, code in (
        (None, "ListModels", mpb.ListModelsRequest(), grpc.StatusCode.UNAUTHENTICATED),
        (None, "RegisterModel", register, grpc.StatusCode.UNAUTHENTICATED),
        ("not-a-token", "ListModels", mpb.ListModelsRequest(), grpc.StatusCode.UNAUTHENTICATED),
        (READER, "RegisterModel", register, grpc.StatusCode.PERMISSION_DENIED),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await manage(mesh, method, request, token)
        assert refused.value.code() == code, (token, method)
        details = refused.value.details() or ""
        assert "role" in details and (token is None or token not in details)
    assert (await manage(mesh, "ListModels", mpb.ListModelsRequest(), READER)).models
    assert (await manage(mesh, "RegisterModel", register, ADMIN)).name == "spare"
    # A client certificate the tokens file maps to a role stands in for a token.
    ops = certs(mesh).issue_client("ops", "ops-reader")
    assert (await manage(mesh, "ListModels", mpb.ListModelsRequest(), pair=ops)).models
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await manage(mesh, "RegisterModel", register, pair=ops)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def served_certificate(mesh: LocalMesh, port: int) -> bytes:
    """The DER certificate a new connection to the client port is given."""
    c = certs(mesh)
    context = ssl.create_default_context(cafile=str(c.client_ca))
    context.load_cert_chain(str(c.client.cert), str(c.client.key))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


async def test_a_certificate_rotated_under_load_fails_no_call(mesh: LocalMesh) -> None:
    node = mesh.nodes[1]
    old = served_certificate(mesh, node.port)
    errors: list[str] = []
    answered = [0]
    stop = asyncio.Event()
    x = np.ones((1, 16), np.float32)

    async def worker(calls_per_connection: int) -> None:
        # Long-lived connections keep their session; fresh ones handshake with whatever is current.
        while not stop.is_set():
            async with client(mesh, node.target) as c:
                for _ in range(calls_per_connection):
                    try:
                        await c.infer("m0", x_input(x), client_timeout=20)
                        answered[0] += 1
                    except Exception as error:  # every failure is a failed call
                        errors.append(str(error))
                    if stop.is_set():
                        break

    load = [asyncio.create_task(worker(5 if i % 2 else 1_000_000)) for i in range(4)]
    try:
        await wait_until(lambda: answered[0] >= 50, 30, "the load to run")
        await asyncio.to_thread(certs(mesh).reissue_server)
        await wait_until(lambda: served_certificate(mesh, node.port) != old, 10, "the new certificate to be served")
        after = answered[0]
        await wait_until(lambda: answered[0] >= after + 200, 30, "calls after the rotation")
    finally:
        stop.set()
        await asyncio.gather(*load)
    assert errors == []
    served = x509.load_der_x509_certificate(served_certificate(mesh, node.port))
    assert served == x509.load_pem_x509_certificate(certs(mesh).server.cert.read_bytes())
