"""An object store through fsspec, on its in-memory filesystem: listings, verified downloads, the models
under a repository prefix, and uploads checked before anything is written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import fsspec
import pytest

from meshnode.errors import InvalidInput, LoadFailed, ModelNotFound
from meshnode.storage.remote import Listing, ObjectStore, RemoteObject, verify_download
from meshnode.storage.uris import StoreOptions, parse_uri
from tests.unit.meshnode.storage.conftest import Put

FILES = {"config.pbtxt": b"name: 'mlp'", "1/model.onnx": b"weights" * 10}






store = ObjectStore(StoreOptions())


def test_a_prefix_lists_every_object_under_it(root: str, put: Put) -> None:
    put(f"{root}/models/mlp", FILES)
    listing = store.listing(parse_uri(f"memory:/{root}/models/mlp"))
    assert not listing.single
    assert [(o.relative, o.size) for o in listing.objects] == [("1/model.onnx", 70), ("config.pbtxt", 11)]
    assert all(o.tag for o in listing.objects) and listing.total_bytes == 81
    assert Listing.from_json(listing.as_json()) == listing


def test_an_object_lists_as_itself(root: str, put: Put) -> None:
    put(root, {"m.onnx": b"abc"})
    listing = store.listing(parse_uri(f"memory:/{root}/m.onnx"))
    assert listing.single and [(o.relative, o.size) for o in listing.objects] == [("", 3)]


def test_nothing_there_is_model_not_found_naming_the_uri(root: str) -> None:
    with pytest.raises(ModelNotFound, match=f"storage_uri 'memory:/{root}/none': listing failed: not found"):
        store.listing(parse_uri(f"memory:/{root}/none"))


def test_fetch_downloads_a_prefix_and_an_object(root: str, put: Put, tmp_path: Path) -> None:
    put(f"{root}/mlp", FILES)
    uri = parse_uri(f"memory:/{root}/mlp")
    model = store.fetch(uri, store.listing(uri), tmp_path / "dir")
    assert model == tmp_path / "dir"
    assert {p.relative_to(model).as_posix(): p.read_bytes() for p in model.rglob("*") if p.is_file()} == FILES
    single = parse_uri(f"memory:/{root}/mlp/1/model.onnx")
    assert store.fetch(single, store.listing(single), tmp_path / "one").read_bytes() == FILES["1/model.onnx"]


def test_a_download_shorter_than_listed_is_never_kept(root: str, put: Put, tmp_path: Path) -> None:
    put(f"{root}/mlp", FILES)
    uri = parse_uri(f"memory:/{root}/mlp")
    listed = store.listing(uri)
    grown = Listing(False, tuple(RemoteObject(o.relative, o.size + 5, o.tag) for o in listed.objects))
    with pytest.raises(LoadFailed, match=f"'memory:/{root}/mlp': object '1/model.onnx' is truncated: 70 of 75"):
        store.fetch(uri, grown, tmp_path)


def test_an_md5_etag_is_checked_against_the_content(tmp_path: Path) -> None:
    local = tmp_path / "model.onnx"
    local.write_bytes(b"weights")
    uri = parse_uri("s3://bucket/model.onnx")
    good = RemoteObject("", 7, f'"{hashlib.md5(b"weights").hexdigest()}"')
    verify_download(uri, good, local, check_md5=True)
    bad = RemoteObject("", 7, f'"{hashlib.md5(b"other").hexdigest()}"')
    with pytest.raises(LoadFailed, match="object 'model.onnx' does not match its ETag"):
        verify_download(uri, bad, local, check_md5=True)
    verify_download(uri, bad, local, check_md5=False)  # a store whose ETags are not MD5s (SSE-KMS)
    multipart = RemoteObject("", 7, '"0123456789abcdef0123456789abcdef-2"')
    verify_download(uri, multipart, local, check_md5=True)  # not an MD5: the size is the check


@pytest.mark.parametrize("key", ["../escape", "./x", "a//b"])
def test_an_object_key_that_would_land_outside_the_copy_fails(root: str, put: Put, tmp_path: Path, key: str) -> None:
    put(f"{root}/mlp", {"1/model.onnx": b"w"})
    fsspec.filesystem("memory").store[f"{root}/mlp/{key}"] = fsspec.filesystem("memory").store[
        f"{root}/mlp/1/model.onnx"]
    with pytest.raises(LoadFailed, match="unsafe object name"):
        store.listing(parse_uri(f"memory:/{root}/mlp"))


def test_list_models_finds_the_triton_layout_under_a_prefix(root: str, put: Put) -> None:
    put(f"{root}/repo/a", FILES)
    put(f"{root}/repo/b", {"3/model.onnx": b"w"})
    put(f"{root}/repo/no_version", {"model.onnx": b"w", "x/model.onnx": b"w"})
    put(f"{root}/repo/.hidden", {"1/model.onnx": b"w"})
    put(root, {"repo/loose.onnx": b"w"})
    assert store.list_models_now(f"memory:/{root}/repo") == {
        "a": f"memory://{root}/repo/a", "b": f"memory://{root}/repo/b"}
    assert store.list_models_now(f"memory:/{root}/empty") == {}


def test_list_models_of_a_local_repository(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"w")
    assert store.list_models_now(str(tmp_path)) == {"m": str(tmp_path / "m")}
    assert store.list_models_now(f"file://{tmp_path}") == {"m": str(tmp_path / "m")}


def test_an_http_repository_cannot_be_listed_or_written() -> None:
    with pytest.raises(InvalidInput, match="cannot be listed"):
        store.list_models_now("http://127.0.0.1:1/repo")
    with pytest.raises(InvalidInput, match="cannot write"):
        store.write_model_now("http://127.0.0.1:1/repo", "m", FILES)


async def test_write_model_puts_every_file_and_lists_back(root: str) -> None:
    uri = await store.write_model(f"memory:/{root}/repo", "up", FILES)
    assert uri == f"memory://{root}/repo/up"
    assert store.list_models_now(f"memory:/{root}/repo") == {"up": uri}
    assert fsspec.filesystem("memory").cat(f"{root}/repo/up/1/model.onnx") == FILES["1/model.onnx"]


def test_write_model_to_a_local_store(tmp_path: Path) -> None:
    uri = store.write_model_now(str(tmp_path), "up", FILES)
    assert uri == str(tmp_path / "up") and (tmp_path / "up" / "config.pbtxt").read_bytes() == FILES["config.pbtxt"]


@pytest.mark.parametrize(("name", "files", "says"), [
    ("m", {"../x": b""}, "Invalid file path"),
    ("m", {"/etc/x": b""}, "Invalid file path"),
    ("m", {"1/a\x00b": b""}, "NUL byte"),
    ("m", {"1/m": b"", "1/m/x": b""}, "clash"),
    ("../m", {"1/m": b""}, "invalid model name"),
])
def test_a_bad_upload_writes_nothing(root: str, name: str, files: dict[str, bytes], says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        store.write_model_now(f"memory:/{root}/repo", name, files)
    assert not fsspec.filesystem("memory").exists(f"{root}/repo")
