"""Throwaway certificates for a mesh on loopback (`meshserve local --tls`, the tests and the bench).

Two CAs, so that a client's certificate can never pass for a mesh member's: the mesh CA signs the peers'
certificate (and etcd's), the client CA signs the client port's certificate and the clients' certificates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import trustme

_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _issue(ca: trustme.CA, directory: Path, name: str, *identities: str) -> Pair:
    """Write the pair as a rotation would: each file complete under a temporary name, then renamed over."""
    issued = ca.issue_cert(*identities)
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    for blob, path in ((issued.private_key_pem, pair.key), (issued.cert_chain_pems[0], pair.cert)):
        temporary = path.with_suffix(".new")
        blob.write_to_path(str(temporary))
        temporary.chmod(0o600)
        os.replace(temporary, path)
    return pair


@dataclass(frozen=True)
class MeshCerts:
    directory: Path
    mesh_ca: Path
    client_ca: Path
    peer: Pair  # every node's certificate towards peers (and etcd's client certificate)
    server: Pair  # the client port's certificate
    etcd: Pair  # etcd's server certificate
    client: Pair  # a client's certificate (CLI, tests), signed by the client CA
    _client_authority: trustme.CA = field(repr=False)
    _names: tuple[str, ...] = _NAMES

    @classmethod
    def generate(cls, directory: Path, names: tuple[str, ...] = _NAMES) -> MeshCerts:
        """names: the addresses and DNS names the servers' certificates cover (hosts with addresses of their own)."""
        directory.mkdir(parents=True, exist_ok=True)
        mesh, client = trustme.CA(), trustme.CA()
        mesh.cert_pem.write_to_path(str(directory / "mesh-ca.pem"))
        client.cert_pem.write_to_path(str(directory / "client-ca.pem"))
        return cls(directory, directory / "mesh-ca.pem", directory / "client-ca.pem",
                   peer=_issue(mesh, directory, "peer", *names, "meshserve-node"),
                   server=_issue(client, directory, "server", *names),
                   etcd=_issue(mesh, directory, "etcd", *names),
                   client=_issue(client, directory, "client", "meshserve-client"), _client_authority=client,
                   _names=names)

    def reissue_server(self) -> None:
        """A new client-port certificate in place of the old, as cert-manager rotates it."""
        _issue(self._client_authority, self.directory, "server", *self._names)

    def issue_client(self, name: str, identity: str) -> Pair:
        """Another client certificate, naming `identity` (which the tokens file may map to a role)."""
        return _issue(self._client_authority, self.directory, name, identity)

    def node_args(self, require_client_certs: bool = False) -> list[str]:
        """`meshserve node` flags: mutual TLS between peers, TLS on the client port, etcd over mutual TLS."""
        args = ["--peer-cert", str(self.peer.cert), "--peer-key", str(self.peer.key), "--peer-ca", str(self.mesh_ca),
                "--tls-cert", str(self.server.cert), "--tls-key", str(self.server.key),
                "--etcd-ca", str(self.mesh_ca), "--etcd-cert", str(self.peer.cert), "--etcd-key", str(self.peer.key)]
        return args + (["--tls-client-ca", str(self.client_ca)] if require_client_certs else [])
