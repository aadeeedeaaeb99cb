"""Model archives extract into their own directory only: every member that would land elsewhere is refused,
naming the archive's URI and the member; a broken archive is a load failure naming the cause."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from meshnode.errors import LoadFailed
from meshnode.storage.archives import extract

URI = "s3://bucket/m.tgz"


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o644
    return info


def _zip(path: Path, members: dict[str, bytes], modes: dict[str, int] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            if modes and name in modes:
                info.external_attr = modes[name] << 16
            zf.writestr(info, data)
    return path


def test_a_tar_wrapping_one_model_directory_gives_that_directory(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "m.tgz", [(_member("mlp/config.pbtxt"), b"cfg"), (_member("mlp/1/model.onnx"), b"w")])
    model = extract(archive, tmp_path / "out", URI)
    assert model == tmp_path / "out" / "mlp"
    assert (model / "1" / "model.onnx").read_bytes() == b"w"


def test_a_flat_archive_gives_the_target_and_a_lone_file_gives_the_file(tmp_path: Path) -> None:
    flat = _zip(tmp_path / "flat.zip", {"config.pbtxt": b"cfg", "1/model.onnx": b"w"})
    assert extract(flat, tmp_path / "flat", URI) == tmp_path / "flat"
    lone = _zip(tmp_path / "lone.zip", {"model.onnx": b"w"})
    assert extract(lone, tmp_path / "lone", URI) == tmp_path / "lone" / "model.onnx"


@pytest.mark.parametrize(("member", "says"), [
    (_member("../evil"), "'../evil'"),
    (_member("m/../../evil"), "'m/../../evil'"),
    (_member("/etc/evil"), "'/etc/evil'"),
    (_member("m/link", tarfile.SYMTYPE, "../../outside"), "'m/link'"),
    (_member("m/abslink", tarfile.SYMTYPE, "/etc/passwd"), "'m/abslink'"),
    (_member("m/hard", tarfile.LNKTYPE, "../outside"), "'m/hard'"),
    (_member("m/dev", tarfile.CHRTYPE), "'m/dev'"),
    (_member("m/fifo", tarfile.FIFOTYPE), "'m/fifo'"),
])
def test_a_tar_member_outside_its_directory_is_refused(tmp_path: Path, member: tarfile.TarInfo, says: str) -> None:
    archive = _tar(tmp_path / "bad.tgz", [(_member("m/1/model.onnx"), b"w"), (member, b"x")])
    with pytest.raises(LoadFailed, match=f"storage_uri '{URI}': unsafe archive member {says}"):
        extract(archive, tmp_path / "out" / "target", URI)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "evil").exists()


@pytest.mark.parametrize(("name", "mode", "says"), [
    ("../evil", 0, r"'\.\./evil': a path outside"),
    ("/abs/evil", 0, "'/abs/evil': an absolute path"),
    ("C:/evil", 0, "'C:/evil': an absolute path"),
    ("m/..\\..\\evil", 0, ".*': a path outside"),
    ("m/link", stat.S_IFLNK | 0o777, "'m/link': not a regular file"),
])
def test_a_zip_member_outside_its_directory_is_refused_before_any_write(
        tmp_path: Path, name: str, mode: int, says: str) -> None:
    archive = _zip(tmp_path / "bad.zip", {"m/1/model.onnx": b"w", name: b"x"}, {name: mode} if mode else None)
    with pytest.raises(LoadFailed, match=f"unsafe archive member {says}"):
        extract(archive, tmp_path / "out", URI)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("suffix", [".tgz", ".zip"])
def test_a_truncated_archive_is_a_load_failure_naming_the_uri(tmp_path: Path, suffix: str) -> None:
    whole = tmp_path / f"whole{suffix}"
    content = {"m/1/model.onnx": bytes(range(256)) * 400}
    if suffix == ".zip":
        _zip(whole, content)
    else:
        _tar(whole, [(_member(n), d) for n, d in content.items()])
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(LoadFailed, match=f"storage_uri '{URI}': corrupt or truncated archive: "):
        extract(cut, tmp_path / "out", URI)


def test_a_zip_whose_content_fails_its_crc_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "m.zip", {"model.onnx": b"A" * 1000})
    data = bytearray(archive.read_bytes())
    data[data.index(b"A" * 10)] = ord("B")  # stored, not deflated: the byte is in the member's data
    archive.write_bytes(bytes(data))
    with pytest.raises(LoadFailed, match="member 'model.onnx' fails its CRC check"):
        extract(archive, tmp_path / "out", URI)
