"""TLS material for gRPC: server credentials that follow their files, and channel credentials.

A server's certificate is read again when its files change (cert-manager and the like rotate them in
place): gRPC asks the fetcher below at every new handshake, so connections made before a rotation keep
their session and their calls, and new connections get the new certificate. A half-written rotation (a
key that does not match the certificate, an unreadable file) keeps the previous material.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerTls:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: callers must present a certificate this CA signed (mTLS)


@dataclass(frozen=True, slots=True)
class ClientTls:
    ca: Path | None = None  # None: the system's roots
    cert: Path | None = None  # with key: present this certificate (mTLS)
    key: Path | None = None


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def key_matches_cert(key_pem: bytes, cert_pem: bytes) -> bool:
    """Does the private key belong to the (first) certificate in the chain?"""
    key = serialization.load_pem_private_key(key_pem, password=None)
    cert = x509.load_pem_x509_certificate(cert_pem)
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    return bool(key.public_key().public_bytes(encoding, raw) == cert.public_key().public_bytes(encoding, raw))


class _Reloader:
    """gRPC's certificate config fetcher: new material when the files' modification times changed."""

    def __init__(self, tls: ServerTls, stat: Callable[[Path], object]) -> None:
        self._tls = tls
        self._stat = stat
        self._seen = self._stamp()
        self.initial = self._config()
        self.reloads = 0

    def _paths(self) -> tuple[Path, ...]:
        return tuple(p for p in (self._tls.cert, self._tls.key, self._tls.client_ca) if p is not None)

    def _stamp(self) -> tuple[object, ...]:
        return tuple(self._stat(p) for p in self._paths())

    def _config(self) -> grpc.ServerCertificateConfiguration:
        cert, key = self._tls.cert.read_bytes(), self._tls.key.read_bytes()
        if not key_matches_cert(key, cert):
            raise ValueError(f"the key {self._tls.key} does not belong to the certificate {self._tls.cert}")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=_read(self._tls.client_ca))

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = self._stamp()
            if stamp == self._seen:
                return None
            config = self._config()
        except (OSError, ValueError) as error:
            # Mid-rotation (files replaced one by one): keep serving the old pair, look again next handshake.
            log.warning("TLS files %s not reloaded yet: %s", self._tls.cert, error)
            return None
        self._seen = stamp
        self.reloads += 1
        log.info("TLS certificate %s reloaded", self._tls.cert)
        return config


def _file_stamp(path: Path) -> object:
    # A rotation replaces the file (or the symlink to it) within the same second as often as not.
    st = path.stat()
    return st.st_mtime_ns, st.st_ino, st.st_size


def server_credentials(tls: ServerTls, stat: Callable[[Path], object] = _file_stamp) -> grpc.ServerCredentials:
    reloader = _Reloader(tls, stat)
    # The fetcher may answer None (keep the current material); types-grpcio does not say so.
    fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], reloader)
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial, fetcher, require_client_authentication=tls.client_ca is not None)


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=_read(tls.ca), private_key=_read(tls.key),
                                        certificate_chain=_read(tls.cert))
