"""Throwaway certificates: two CAs, so a client's certificate never passes for a mesh member's."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from meshnode.local.certs import MeshCerts
from meshnode.net.tls import key_matches_cert


def issuer(path: Path) -> x509.Name:
    return x509.load_pem_x509_certificate(path.read_bytes()).issuer


def subject(path: Path) -> x509.Name:
    return x509.load_pem_x509_certificate(path.read_bytes()).subject


def test_each_pair_matches_and_comes_from_its_ca(tmp_path: Path) -> None:
    certs = MeshCerts.generate(tmp_path)
    for pair in (certs.peer, certs.server, certs.etcd, certs.client):
        assert key_matches_cert(pair.key.read_bytes(), pair.cert.read_bytes())
        assert pair.key.stat().st_mode & 0o077 == 0
    assert issuer(certs.peer.cert) == issuer(certs.etcd.cert) == subject(certs.mesh_ca)
    assert issuer(certs.server.cert) == issuer(certs.client.cert) == subject(certs.client_ca)
    assert subject(certs.mesh_ca) != subject(certs.client_ca)


def test_a_reissued_server_certificate_replaces_the_old(tmp_path: Path) -> None:
    certs = MeshCerts.generate(tmp_path)
    old = certs.server.cert.read_bytes()
    certs.reissue_server()
    assert certs.server.cert.read_bytes() != old
    assert key_matches_cert(certs.server.key.read_bytes(), certs.server.cert.read_bytes())
    assert "--tls-client-ca" in certs.node_args(require_client_certs=True)
    assert "--tls-client-ca" not in certs.node_args()
