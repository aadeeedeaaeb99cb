"""The storage layer against real stores: moto's S3 server as a process (with IAM auth on) reached through
s3fs/botocore, and the standard library's HTTP server. The server's own request log says what was read."""

from __future__ import annotations

import asyncio
import io
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import onnxruntime as ort
import pytest

from deploy.local.models import write_mlp
from meshnode.errors import LoadFailed, ModelNotFound, PermissionDenied, StorageUnavailable
from meshnode.storage.disk_cache import DiskCache
from meshnode.storage.materializer import Materializer
from meshnode.storage.remote import ObjectStore
from tests.integration.helpers import positive, run_quick_bench
from tests.integration.s3_server import BUCKET, MotoS3, http_files, moto_s3


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    with moto_s3(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A real ONNX model in Triton layout, as {relative path: bytes}."""
    root = tmp_path_factory.mktemp("model")
    write_mlp(root, "mlp", approx_bytes=200_000)
    model_dir = root / "mlp"
    return {p.relative_to(model_dir).as_posix(): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}


def _tree(model: Path) -> dict[str, bytes]:
    return {p.relative_to(model).as_posix(): p.read_bytes() for p in model.rglob("*") if p.is_file()}


def _names(directory: Path, pattern: str = "*") -> list[str]:
    return sorted(p.name for p in directory.rglob(pattern))


def _tgz(files: dict[str, bytes], wrap: str = "mlp") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{wrap}/{name}" if wrap else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _materializer(s3: MotoS3, cache: Path, **options: object) -> Materializer:
    return Materializer(ObjectStore(s3.options(**options)), DiskCache(cache))


async def test_a_model_is_pulled_once_and_a_restarted_node_reads_no_object(
        s3: MotoS3, prefix: str, model_files: dict[str, bytes], tmp_path: Path) -> None:
    s3.put_files(f"{prefix}/mlp", {**model_files, "": b"", "1/": b""})  # with folder markers, which are skipped
    uri = f"s3://{BUCKET}/{prefix}/mlp"
    s3.clear_requests()
    materializer = _materializer(s3, tmp_path)
    model = await materializer.materialize(uri)
    assert _tree(model) == model_files
    ort.InferenceSession(str(model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sorted(s3.object_gets()) == sorted(f"/{BUCKET}/{prefix}/mlp/{name}" for name in model_files)

    s3.clear_requests()
    assert await materializer.materialize(uri) == model
    restarted = _materializer(s3, tmp_path)
    assert await restarted.materialize(uri) == model
    assert s3.object_gets() == [] and len(s3.requests()) == 2  # one listing each
    assert (materializer.stats().hits, materializer.stats().misses, restarted.stats().hits) == (1, 1, 1)
    assert materializer.stats().bytes_pulled == sum(len(d) for d in model_files.values())


async def test_one_listing_tells_a_model_from_its_siblings(s3: MotoS3, prefix: str, tmp_path: Path) -> None:
    s3.put_files(prefix, {"m/1/model.onnx": b"m", "m2/1/model.onnx": b"m2", "m.bak": b"old", "m": b"beside",
                          "one.onnx": b"single", "one.onnx.bak": b"old"})
    materializer = _materializer(s3, tmp_path)
    s3.clear_requests()
    model = await materializer.materialize(f"s3://{BUCKET}/{prefix}/m")
    assert _tree(model) == {"1/model.onnx": b"m"}
    single = await materializer.materialize(f"s3://{BUCKET}/{prefix}/one.onnx")
    assert single.read_bytes() == b"single"
    assert [r.method for r in s3.requests()] == ["GET", "GET", "GET", "GET"]  # a listing and a read each
    assert s3.object_gets() == [f"/{BUCKET}/{prefix}/m/1/model.onnx", f"/{BUCKET}/{prefix}/one.onnx"]


async def test_a_changed_etag_is_downloaded_again(s3: MotoS3, prefix: str, tmp_path: Path) -> None:
    s3.put_files(f"{prefix}/m", {"1/model.onnx": b"old"})
    materializer = _materializer(s3, tmp_path)
    await materializer.materialize(f"s3://{BUCKET}/{prefix}/m")
    s3.put_files(f"{prefix}/m", {"1/model.onnx": b"new"})  # same size, new ETag
    s3.clear_requests()
    model = await materializer.materialize(f"s3://{BUCKET}/{prefix}/m")
    assert (model / "1" / "model.onnx").read_bytes() == b"new"
    assert s3.object_gets() == [f"/{BUCKET}/{prefix}/m/1/model.onnx"]


async def test_concurrent_materializations_download_once(s3: MotoS3, prefix: str, tmp_path: Path) -> None:
    s3.put_files(f"{prefix}/m", {"1/model.onnx": b"w" * 100_000})
    materializer = _materializer(s3, tmp_path)
    s3.clear_requests()
    paths = await asyncio.gather(*(materializer.materialize(f"s3://{BUCKET}/{prefix}/m") for _ in range(4)))
    assert len(set(paths)) == 1 and s3.object_gets() == [f"/{BUCKET}/{prefix}/m/1/model.onnx"]


async def test_wrong_credentials_are_permission_denied(s3: MotoS3, prefix: str, tmp_path: Path) -> None:
    s3.put_files(f"{prefix}/m", {"1/model.onnx": b"w"})
    for options in ({"s3_secret_access_key": "wrong-secret"}, {"s3_access_key_id": "AKIANOSUCHKEY0000000"}):
        with pytest.raises(PermissionDenied, match=f"storage_uri 's3://{BUCKET}/{prefix}/m': listing failed: "
                                                   "permission denied") as raised:
            await _materializer(s3, tmp_path, **options).materialize(f"s3://{BUCKET}/{prefix}/m")
        assert "wrong-secret" not in str(raised.value)


@pytest.mark.parametrize(("path", "says"), [
    ("{bucket}/{prefix}/missing", "no object at or under"),
    ("{bucket}/{prefix}/only_markers", "no object under"),
    ("{bucket}/{prefix}/m/1/missing.onnx", "no object at or under"),
    ("no-such-bucket-{prefix}/m", "The specified bucket does not exist"),
])
async def test_a_missing_key_or_bucket_is_not_found(s3: MotoS3, prefix: str, tmp_path: Path, path: str,
                                                    says: str) -> None:
    uri = "s3://" + path.format(bucket=BUCKET, prefix=prefix)
    s3.put_files(f"{prefix}/only_markers", {"": b"", "1/": b""})  # folders as S3 consoles make them
    with pytest.raises(ModelNotFound, match=f"storage_uri '{uri}': listing failed: not found in the store .*{says}"):
        await _materializer(s3, tmp_path).materialize(uri)


async def test_a_truncated_archive_object_fails_its_load(
        s3: MotoS3, prefix: str, model_files: dict[str, bytes], tmp_path: Path) -> None:
    whole = _tgz(model_files)
    s3.put_files(prefix, {"mlp.tgz": whole[: len(whole) // 2]})
    uri = f"s3://{BUCKET}/{prefix}/mlp.tgz"
    with pytest.raises(LoadFailed, match=f"storage_uri '{uri}': corrupt or truncated archive"):
        await _materializer(s3, tmp_path).materialize(uri)
    assert _names(tmp_path) == []


async def test_an_archive_with_dotdot_members_is_refused(s3: MotoS3, prefix: str, tmp_path: Path) -> None:
    s3.put_files(prefix, {"evil.tar.gz": _tgz({"1/model.onnx": b"w", "../../escaped": b"x"})})
    uri = f"s3://{BUCKET}/{prefix}/evil.tar.gz"
    with pytest.raises(LoadFailed, match=f"storage_uri '{uri}': unsafe archive member 'mlp/../../escaped'"):
        await _materializer(s3, tmp_path / "cache").materialize(uri)
    assert not _names(tmp_path, "escaped") and _names(tmp_path / "cache") == []


async def test_an_archive_in_the_bucket_is_extracted(
        s3: MotoS3, prefix: str, model_files: dict[str, bytes], tmp_path: Path) -> None:
    s3.put_files(prefix, {"mlp.tgz": _tgz(model_files)})
    model = await _materializer(s3, tmp_path).materialize(f"s3://{BUCKET}/{prefix}/mlp.tgz")
    assert model.name == "mlp" and _tree(model) == model_files


async def test_list_and_write_models_in_the_bucket(s3: MotoS3, prefix: str, model_files: dict[str, bytes]) -> None:
    store = ObjectStore(s3.options())
    s3.put_files(f"{prefix}/repo/a", model_files)
    uri = await store.write_model(f"s3://{BUCKET}/{prefix}/repo", "uploaded", model_files)
    assert uri == f"s3://{BUCKET}/{prefix}/repo/uploaded"
    assert await store.list_models(f"s3://{BUCKET}/{prefix}/repo") == {
        "a": f"s3://{BUCKET}/{prefix}/repo/a", "uploaded": uri}


async def test_http_model_file_archive_and_truncated_body(model_files: dict[str, bytes], tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    (served / "model.onnx").write_bytes(model_files["1/model.onnx"])
    (served / "mlp.tar.gz").write_bytes(_tgz(model_files))
    materializer = Materializer(ObjectStore(MotoS3(tmp_path).options()), DiskCache(tmp_path / "cache"))
    with http_files(served) as base:
        single = await materializer.materialize(f"{base}/model.onnx")
        assert single.name == "model.onnx" and single.read_bytes() == model_files["1/model.onnx"]
        assert _tree(await materializer.materialize(f"{base}/mlp.tar.gz")) == model_files
        assert await materializer.materialize(f"{base}/model.onnx") == single and materializer.stats().hits == 1
        with pytest.raises(LoadFailed, match=f"storage_uri '{base}/truncated/model.onnx': .*"
                                             "(truncated|ClientPayloadError|not completed)"):
            await materializer.materialize(f"{base}/truncated/model.onnx")
        with pytest.raises(ModelNotFound, match=f"storage_uri '{base}/nothing.onnx'"):
            await materializer.materialize(f"{base}/nothing.onnx")
    # The server is gone: what is on disk still materializes, the rest is UNAVAILABLE (not NOT_FOUND).
    assert await materializer.materialize(f"{base}/model.onnx") == single
    with pytest.raises(StorageUnavailable, match=f"storage_uri '{base}/other.onnx': listing failed: the store is "
                                                 "unavailable"):
        await materializer.materialize(f"{base}/other.onnx")


async def test_with_the_store_stopped_models_on_disk_still_materialize(
        model_files: dict[str, bytes], tmp_path: Path) -> None:
    with moto_s3(tmp_path) as s3:
        s3.put_files("on-disk", model_files)
        s3.put_files("elsewhere", model_files)
        materializer = _materializer(s3, tmp_path / "cache")
        model = await materializer.materialize(f"s3://{BUCKET}/on-disk")
        s3.stop()
        assert await materializer.materialize(f"s3://{BUCKET}/on-disk") == model
        with pytest.raises(StorageUnavailable, match=f"storage_uri 's3://{BUCKET}/elsewhere': listing failed: "
                                                     "the store is unavailable"):
            await materializer.materialize(f"s3://{BUCKET}/elsewhere")
        assert _tree(model) == model_files


def test_the_pull_bench_runs() -> None:
    result = run_quick_bench("bench.pull", time_limit_s=120)
    assert all(positive(value) for value in result["ratios"].values())
    assert result["model_bytes"] > 500_000 and len(result["rounds"]) == 1
