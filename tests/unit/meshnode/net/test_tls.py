"""Server TLS material follows its files: re-read when they change, the old kept while a rotation is half done."""

from __future__ import annotations

from pathlib import Path

import trustme

from meshnode.net.tls import ServerTls, _Reloader, key_matches_cert


def write(ca: trustme.CA, directory: Path) -> ServerTls:
    issued = ca.issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    issued.private_key_pem.write_to_path(str(directory / "key.pem"))
    return ServerTls(directory / "cert.pem", directory / "key.pem")


def test_a_key_matches_only_its_own_certificate() -> None:
    ca = trustme.CA()
    one, other = ca.issue_cert("a"), ca.issue_cert("b")
    assert key_matches_cert(one.private_key_pem.bytes(), one.cert_chain_pems[0].bytes())
    assert not key_matches_cert(other.private_key_pem.bytes(), one.cert_chain_pems[0].bytes())


def test_the_files_are_read_again_only_when_they_changed(tmp_path: Path) -> None:
    ca = trustme.CA()
    tls = write(ca, tmp_path)
    stamps = {"n": 0}
    reloader = _Reloader(tls, lambda path: (path.name, stamps["n"]))
    assert reloader() is None  # unchanged: gRPC keeps what it has
    write(ca, tmp_path)
    stamps["n"] += 1
    assert reloader() is not None and reloader.reloads == 1
    assert reloader() is None


def test_a_half_done_rotation_keeps_the_old_pair_until_it_is_complete(tmp_path: Path) -> None:
    ca = trustme.CA()
    tls = write(ca, tmp_path)
    stamps = {"n": 0}
    reloader = _Reloader(tls, lambda path: (path.name, stamps["n"]))
    ca.issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(tls.cert))  # new cert, old key
    stamps["n"] += 1
    assert reloader() is None and reloader.reloads == 0
    write(ca, tmp_path)  # the key follows
    stamps["n"] += 1
    assert reloader() is not None and reloader.reloads == 1


def test_an_unreadable_file_mid_rotation_keeps_the_old_pair(tmp_path: Path) -> None:
    ca = trustme.CA()
    tls = write(ca, tmp_path)
    reloader = _Reloader(tls, lambda path: path.stat().st_mtime_ns if path.exists() else None)
    tls.key.unlink()
    assert reloader() is None
