"""TritonRuntime on its own against a real Triton: load (by name and by upload), infer, unload, size, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from deploy.local.triton_models import write_python_add_sub
from meshnode.errors import InvalidInput, LoadFailed, ModelLost, ModelUnavailable
from meshnode.local.triton import TritonProcess
from meshnode.runtimes.triton import BACKEND_OVERHEAD_BYTES, TritonModel, TritonRuntime
from meshnode.storage.repository import model_source
from meshpb import pb

pytestmark = pytest.mark.timeout(60)
WIDTH = 4


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton-direct")
    write_python_add_sub(root, "add", width=WIDTH)
    for version in (1, 2):
        pair = write_python_add_sub(root, "pair", version=version, width=WIDTH)
    with (pair / "config.pbtxt").open("a") as config:
        config.write("version_policy: { all { } }\n")
    return root


@pytest.fixture(scope="module")
def triton(tritons: Callable[[Path], TritonProcess], repo: Path) -> TritonProcess:
    return tritons(repo)


@pytest.fixture
async def runtime(triton: TritonProcess, repo: Path) -> AsyncIterator[TritonRuntime]:
    rt = TritonRuntime(triton.grpc_target, repo)
    yield rt
    await rt.close()


def add_request(name: str, width: int = WIDTH) -> pb.ModelInferRequest:
    a, b = np.arange(width, dtype=np.float32).reshape(1, width), np.ones((1, width), np.float32)
    return pb.ModelInferRequest(
        model_name=name,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=n, datatype="FP32", shape=[1, width])
                for n in ("INPUT0", "INPUT1")],
        raw_input_contents=[a.tobytes(), b.tobytes()],
    )


async def check(model: TritonModel) -> None:
    response = await model.infer(add_request(model.name))
    assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"]
    total = np.frombuffer(response.raw_output_contents[0], np.float32)
    np.testing.assert_array_equal(total, np.arange(WIDTH, dtype=np.float32) + 1)


def ready_in_triton(triton: TritonProcess, name: str) -> bool:
    with grpcclient.InferenceServerClient(triton.grpc_target) as client:
        return bool(client.is_model_ready(name))


async def test_load_by_name_infer_size_and_unload(runtime: TritonRuntime, triton: TritonProcess, repo: Path) -> None:
    source = model_source("add", repo / "add", "")
    files = sum(p.stat().st_size for p in (repo / "add").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert runtime.predict_size(source) == files + BACKEND_OVERHEAD_BYTES["python"]
    model = await runtime.load(source)
    assert (model.name, model.version, model.platform) == ("add", "1", "python")
    assert [(t.name, t.datatype, t.shape) for t in model.inputs] == [
        ("INPUT0", "FP32", (-1, WIDTH)), ("INPUT1", "FP32", (-1, WIDTH))]
    assert model.size_bytes == files + BACKEND_OVERHEAD_BYTES["python"]  # the Python backend's measured overhead
    await check(model)

    with pytest.raises(InvalidInput, match=r"unexpected shape for input 'INPUT\d' for model 'add'"):
        await model.infer(add_request("add", width=WIDTH + 1))

    await runtime.unload(model)
    await runtime.unload(model)  # idempotent
    assert not ready_in_triton(triton, "add")
    with pytest.raises(ModelUnavailable, match="'add' is not loaded on Triton"):
        await model.infer(add_request("add"))


async def test_a_reload_while_unloading_works_and_the_stale_copy_cannot_unload_it(
    runtime: TritonRuntime, triton: TritonProcess, repo: Path,
) -> None:
    source = model_source("add", repo / "add", "")
    old = await runtime.load(source)
    await runtime.unload(old)  # Triton answers at once and stays UNLOADING for ~0.7 s
    new = await runtime.load(source)
    await check(new)
    await runtime.unload(old)  # a stale handle: the name now belongs to the new load
    assert ready_in_triton(triton, "add")
    await check(new)
    await runtime.unload(new)


def ready_versions(triton: TritonProcess, name: str) -> list[str]:
    with grpcclient.InferenceServerClient(triton.grpc_target) as client:
        index = client.get_model_repository_index(as_json=True).get("models", [])
    return sorted(m["version"] for m in index if m["name"] == name and m.get("state") == "READY")


async def test_versions_load_side_by_side_and_unload_one_at_a_time(
    runtime: TritonRuntime, triton: TritonProcess, repo: Path,
) -> None:
    first = await runtime.load(model_source("pair", repo / "pair", "1"))
    second = await runtime.load(model_source("pair", repo / "pair", "2"))
    assert ready_versions(triton, "pair") == ["1", "2"]
    await check(first)
    await check(second)
    await runtime.unload(first)
    assert ready_versions(triton, "pair") == ["2"]
    await check(second)  # untouched by the other version's unload
    await runtime.unload(second)
    assert not ready_in_triton(triton, "pair")


async def test_storage_outside_tritons_repository_is_uploaded_under_the_models_name(
    runtime: TritonRuntime, triton: TritonProcess, tmp_path: Path,
) -> None:
    storage = write_python_add_sub(tmp_path, "original-name", width=WIDTH)
    model = await runtime.load(model_source("renamed", storage, ""))
    assert ready_in_triton(triton, "renamed") and not (triton.model_repository / "renamed").exists()
    await check(model)
    await runtime.unload(model)


async def test_a_failing_load_names_the_model_and_gives_tritons_reason(runtime: TritonRuntime, tmp_path: Path) -> None:
    storage = write_python_add_sub(tmp_path, "broken", width=WIDTH)
    (storage / "1" / "model.py").write_text("raise ValueError('model.py is broken on purpose')\n")
    with pytest.raises(LoadFailed, match=r"model 'broken' version 1 on Triton at .*broken on purpose"):
        await runtime.load(model_source("broken", storage, ""))


async def test_an_unreachable_triton_fails_loads_and_requests_naming_its_address(repo: Path) -> None:
    runtime = TritonRuntime("127.0.0.1:1")
    try:
        # Triton gone, not the model broken: UNAVAILABLE, so a node that forwarded the load tries elsewhere.
        with pytest.raises(ModelUnavailable, match=r"Triton at 127\.0\.0\.1:1 is unreachable") as load:
            await runtime.load(model_source("add", repo / "add", ""))
        assert load.value.code == grpc.StatusCode.UNAVAILABLE and not isinstance(load.value, LoadFailed)
        model = TritonModel(runtime, model_source("add", repo / "add", ""), pb.ModelMetadataResponse(), 0)
        # Not run: the node forgets its copy and routes the request again (ModelLost).
        with pytest.raises(ModelLost, match=r"Triton at 127\.0\.0\.1:1 is unreachable"):
            await model.infer(add_request("add"))
    finally:
        await runtime.close()
