"""Storage URIs and uploads the file system would refuse are InvalidInput naming what is wrong, never an OSError,
ValueError or RuntimeError (which the api layer answers INTERNAL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshnode.errors import InvalidInput
from meshnode.storage.repository import ModelRepository, check_model_name, resolve_storage_uri


def test_an_existing_path_or_file_uri_resolves(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    assert resolve_storage_uri(str(tmp_path / "m")) == (tmp_path / "m").resolve()
    assert resolve_storage_uri(f"file://{tmp_path}/m") == (tmp_path / "m").resolve()


@pytest.mark.parametrize(("uri", "says"), [
    ("{root}/a\x00b", r"^storage_uri '.*a\\x00b' contains a NUL byte$"),
    ("file://{root}/a%00b", r"^storage_uri '.*a\\x00b' contains a NUL byte$"),
    ("~no-such-user-meshserve/m", r"^storage_uri '~no-such-user-meshserve/m': no such user's home directory "
                                  r"'~no-such-user-meshserve'$"),
    ("{root}/" + "x" * 300, r"^storage_uri '.*' has a name longer than 255 bytes: 'x{200}\.\.\. \(300 characters\)'$"),
    ("{root}/" + "\u00e9" * 128, r"has a name longer than 255 bytes"),  # 128 characters, 256 bytes
    ("{root}/missing", r"^storage_uri '.*/missing' does not exist$"),
    ("s3://bucket/m", r"^unsupported storage_uri scheme 's3'"),
])
def test_a_uri_the_file_system_refuses_is_invalid_input(tmp_path: Path, uri: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        resolve_storage_uri(uri.format(root=tmp_path))


def test_a_long_uri_is_clipped_in_the_message(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as raised:
        resolve_storage_uri("/".join(["x" * 200] * 100))
    assert len(str(raised.value)) < 1000


@pytest.mark.parametrize(("files", "says"), [
    ({"a\x00b": b"x"}, r"^Invalid file path in load parameters: upload path 'a\\x00b' contains a NUL byte$"),
    ({"y" * 300: b"x"}, r"^Invalid file path in load parameters: upload path 'y{200}\.\.\. \(300 characters\)' has "
                        r"a name longer than 255 bytes"),
    ({"1/model.onnx": b"x", "1/model.onnx/x": b"x"},
     r"^uploads 'file:1/model.onnx' and 'file:1/model.onnx/x' clash: '1/model.onnx' cannot be both a file and a "
     r"directory$"),
    ({"1/model.onnx/x": b"x", "./1/model.onnx": b"x"}, r"^uploads 'file:./1/model.onnx' and 'file:1/model.onnx/x'"),
    ({"../x": b"x"}, r"^Invalid file path '../x' in load parameters$"),
])
def test_uploads_the_file_system_refuses_are_invalid_input_and_write_nothing(
        tmp_path: Path, files: dict[str, bytes], says: str) -> None:
    repository = ModelRepository(tmp_path / "repo")
    with pytest.raises(InvalidInput, match=says):
        repository.store_files("m", files)
    assert not (tmp_path / "repo" / "m").exists()


def test_an_upload_over_an_earlier_uploads_file_or_directory_is_invalid_input(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path / "repo")
    repository.store_files("m", {"1/model.onnx": b"x"})
    with pytest.raises(InvalidInput, match=r"^upload 'file:1/model.onnx/x': a directory on its path is a file of "
                                           r"an earlier upload of model 'm'$"):
        repository.store_files("m", {"1/model.onnx/x": b"x"})
    with pytest.raises(InvalidInput, match=r"^upload 'file:1' is a directory of an earlier upload of model 'm'$"):
        repository.store_files("m", {"1": b"x"})
    assert [p.name for p in (tmp_path / "repo" / "m" / "1").iterdir()] == ["model.onnx"]  # no temporary left


def test_a_model_name_too_long_for_the_file_system_is_refused_before_an_upload(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"^model name '.*' has a name longer than 255 bytes"):
        ModelRepository(tmp_path / "repo").store_files("\u00e9" * 200, {"1/model.onnx": b"x"})


def test_an_invalid_model_name_is_shown_escaped_and_clipped() -> None:
    with pytest.raises(InvalidInput, match=r"^invalid model name 'a\\x00b'$"):
        check_model_name("a\x00b")
    with pytest.raises(InvalidInput, match=r"^invalid model name 'x{200}\.\.\. \(20000 characters\)'$"):
        check_model_name("x" * 20_000)
