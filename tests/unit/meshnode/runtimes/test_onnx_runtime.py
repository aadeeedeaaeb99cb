"""OnnxRuntime against real ONNX Runtime sessions built by meshnode.examples."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploy.local import models as examples
from meshnode.errors import InvalidInput, LoadFailed, ModelUnavailable
from meshnode.runtimes.onnx import PROBE_RUNS, OnnxModel, OnnxRuntime
from meshnode.runtimes.tensors import DATATYPE_TO_NUMPY
from meshnode.storage.repository import ModelSource
from meshpb import pb
from router.errors import MeshError

HAS_PROC = Path("/proc/self/task").is_dir()


def source(model_dir: Path, version: int = 1) -> ModelSource:
    directory = model_dir / str(version)
    return ModelSource(model_dir.name, str(version), directory, directory / "model.onnx")


def _raw(array: np.ndarray) -> bytes:
    if array.dtype == object:
        encoded = [str(item).encode() for item in array.reshape(-1)]
        return b"".join(struct.pack("<I", len(item)) + item for item in encoded)
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def make_request(
    model: str, inputs: dict[str, tuple[str, np.ndarray]], outputs: tuple[str, ...] = ()
) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        id="req-1",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name=n, datatype=dt, shape=a.shape) for n, (dt, a) in inputs.items()
        ],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
        raw_input_contents=[_raw(a) for _, a in inputs.values()],
    )


def fp32(array: np.ndarray) -> dict[str, tuple[str, np.ndarray]]:
    return {"INPUT0": ("FP32", array.astype(np.float32))}


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    result = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.datatype == "BYTES":
            items, offset = [], 0
            while offset < len(raw):
                (length,) = struct.unpack_from("<I", raw, offset)
                items.append(raw[offset + 4 : offset + 4 + length].decode())
                offset += 4 + length
            result[tensor.name] = np.array(items, dtype=object).reshape(tuple(tensor.shape))
        else:
            result[tensor.name] = np.frombuffer(raw, DATATYPE_TO_NUMPY[tensor.datatype]).reshape(tuple(tensor.shape))
    return result


async def infer(model: OnnxModel, inputs: dict[str, tuple[str, np.ndarray]], *outputs: str) -> dict[str, np.ndarray]:
    return outputs_of(await model.infer(make_request(model.name, inputs, outputs)))


def file_size(model_dir: Path) -> int:
    return (model_dir / "1" / "model.onnx").stat().st_size


@pytest.fixture
async def runtime() -> AsyncIterator[OnnxRuntime]:
    rt = OnnxRuntime()
    yield rt
    await rt.close()


@pytest.fixture(scope="module")
def large_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return examples.write_mlp(tmp_path_factory.mktemp("large"), "large", approx_bytes=50_000_000)


async def test_mlp_load_infer_unload(tmp_path: Path) -> None:
    # A threshold no run of this model nears even on a busy machine: the switch to inline is what is tested here.
    runtime = OnnxRuntime(inline_threshold_ms=50.0)
    model_dir = examples.write_mlp(tmp_path, "mlp")
    model = await runtime.load(source(model_dir))
    assert (model.name, model.version, model.platform) == ("mlp", "1", "onnxruntime_onnx")
    assert [(s.name, s.datatype, s.shape) for s in model.inputs] == [("INPUT0", "FP32", (-1, 16))]
    assert [(s.name, s.datatype, s.shape) for s in model.outputs] == [("OUTPUT0", "FP32", (-1, 4))]
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    for _ in range(PROBE_RUNS + 2):  # through the executor while probing, then inline
        got = await infer(model, fp32(x))
        np.testing.assert_allclose(got["OUTPUT0"], examples.mlp_reference(model_dir, x), rtol=1e-4, atol=1e-5)
    assert model.inline
    await runtime.unload(model)
    await runtime.unload(model)  # idempotent
    with pytest.raises(ModelUnavailable):
        await infer(model, fp32(x))
    await runtime.close()


@pytest.mark.parametrize("datatype", sorted(examples.ONNX_TYPES))
async def test_identity_round_trips_every_datatype(runtime: OnnxRuntime, tmp_path: Path, datatype: str) -> None:
    model = await runtime.load(source(examples.write_identity(tmp_path, f"id_{datatype}", datatype)))
    assert model.inputs[0].datatype == datatype and model.outputs[0].datatype == datatype
    rng = np.random.default_rng(2)
    if datatype == "BYTES":
        x = np.array([f"s{i}-é" for i in range(32)], dtype=object).reshape(2, 16)
    elif datatype == "BOOL":
        x = rng.integers(0, 2, (2, 16)).astype(bool)
    else:
        dtype = DATATYPE_TO_NUMPY[datatype]
        x = (rng.standard_normal((2, 16)) * 50).astype(dtype)
    got = await infer(model, {"INPUT0": (datatype, x)})
    np.testing.assert_array_equal(got["OUTPUT0"], x)


async def test_add_sub_both_outputs_and_a_chosen_one(runtime: OnnxRuntime, tmp_path: Path) -> None:
    model = await runtime.load(source(examples.write_add_sub(tmp_path, "simple")))
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.ones((2, 16), np.float32)
    inputs = {"INPUT0": ("FP32", a), "INPUT1": ("FP32", b)}
    got = await infer(model, inputs)
    np.testing.assert_array_equal(got["OUTPUT0"], a + b)
    np.testing.assert_array_equal(got["OUTPUT1"], a - b)
    assert list(await infer(model, inputs, "OUTPUT1")) == ["OUTPUT1"]


def test_write_repository_lays_out_triton_directories(tmp_path: Path) -> None:
    root = examples.write_repository(tmp_path / "repo", [("a", "mlp"), ("simple", "add_sub"), ("s", "identity:BYTES")])
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.onnx")) == [
        "a/1/model.onnx",
        "s/1/model.onnx",
        "simple/1/model.onnx",
    ]
    with pytest.raises(ValueError, match="unknown example kind"):
        examples.write_repository(tmp_path / "repo", [("x", "resnet")])


async def test_matmul_chain_answer(runtime: OnnxRuntime, tmp_path: Path) -> None:
    model_dir = examples.write_matmul_chain(tmp_path, "chain", width=32, depth=3)
    model = await runtime.load(source(model_dir))
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(model_dir / "1" / "model.onnx")).graph.initializer]
    x = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)
    gram = x.T @ x
    for w in weights:
        gram = gram @ w
    np.testing.assert_allclose((await infer(model, fp32(x)))["OUTPUT0"], x @ gram, rtol=1e-3, atol=1e-3)


async def test_size_is_measured_and_at_least_the_file(runtime: OnnxRuntime, tmp_path: Path) -> None:
    model_dir = examples.write_mlp(tmp_path, "mlp1m")
    model = await runtime.load(source(model_dir))
    assert file_size(model_dir) <= model.size_bytes < 3 * file_size(model_dir)
    assert file_size(model_dir) <= runtime.predict_size(source(model_dir)) < 3 * file_size(model_dir)


async def test_files_counted_are_the_version_directory_or_the_single_file(runtime: OnnxRuntime, tmp_path: Path) -> None:
    model_dir = examples.write_mlp(tmp_path, "mlp", approx_bytes=100_000)
    (model_dir / "1" / "weights.bin").write_bytes(bytes(1_000_000))  # as external data would be
    assert runtime.predict_size(source(model_dir)) > 1_000_000
    # A single model file: its directory (here the repository root) is not the model's to count.
    single = tmp_path / "single.onnx"
    single.write_bytes((model_dir / "1" / "model.onnx").read_bytes())
    assert runtime.predict_size(ModelSource("single", "1", tmp_path, single)) < 1_000_000
    model = await runtime.load(ModelSource("single", "1", tmp_path, single))
    assert single.stat().st_size <= model.size_bytes < 1_000_000


@pytest.mark.skipif(not HAS_PROC, reason="RSS is read from /proc")
async def test_concurrent_loads_each_measure_their_own_size(runtime: OnnxRuntime, tmp_path: Path) -> None:
    dirs = [examples.write_mlp(tmp_path, f"m{i}", approx_bytes=(i + 1) * 2_000_000, seed=i) for i in range(4)]
    models = await asyncio.gather(*(runtime.load(source(d)) for d in dirs))
    for model_dir, model in zip(dirs, models, strict=True):
        # Pre-packed weights make ~1.6x; another load's memory counted in would at least double it.
        assert file_size(model_dir) <= model.size_bytes < 2 * file_size(model_dir), model.name


def _write_raw(tmp_path: Path, name: str, data: bytes) -> Path:
    directory = tmp_path / name / "1"
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(data)
    return tmp_path / name


def _write_graph(tmp_path: Path, name: str, node: onnx.NodeProto, elem_type: int) -> Path:
    graph = helper.make_graph(
        [node],
        name,
        [helper.make_tensor_value_info("INPUT0", elem_type, [1])],
        [helper.make_tensor_value_info("OUTPUT0", elem_type, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _write_raw(tmp_path, name, model.SerializeToString())


@pytest.mark.parametrize("kind", ["garbage", "truncated", "png", "unknown_op", "bfloat16"])
async def test_unloadable_files_raise_load_failed_naming_the_model(
    runtime: OnnxRuntime, tmp_path: Path, kind: str
) -> None:
    if kind == "garbage":
        model_dir = _write_raw(tmp_path, "broken", b"this is not an onnx model")
    elif kind == "truncated":
        good = examples.write_mlp(tmp_path / "src", "good") / "1" / "model.onnx"
        model_dir = _write_raw(tmp_path, "broken", good.read_bytes()[:5000])
    elif kind == "png":
        model_dir = _write_raw(tmp_path, "broken", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    elif kind == "unknown_op":
        model_dir = _write_graph(
            tmp_path, "broken", helper.make_node("NoSuchOp", ["INPUT0"], ["OUTPUT0"]), TensorProto.FLOAT
        )
    else:  # a valid model whose type the protocol cannot carry
        model_dir = _write_graph(
            tmp_path, "broken", helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"]), TensorProto.BFLOAT16
        )
    with pytest.raises(LoadFailed) as caught:
        await runtime.load(source(model_dir))
    message = str(caught.value)
    assert "model 'broken' version 1" in message and "model.onnx" in message
    assert "\n" not in message


async def test_missing_file_raises_load_failed(runtime: OnnxRuntime, tmp_path: Path) -> None:
    (tmp_path / "gone" / "1").mkdir(parents=True)
    with pytest.raises(LoadFailed, match="model 'gone' version 1 .*: file not found"):
        await runtime.load(source(tmp_path / "gone"))


async def test_run_errors_are_mapped(runtime: OnnxRuntime, tmp_path: Path) -> None:
    model = await runtime.load(source(examples.write_add_sub(tmp_path, "simple")))
    mismatched = {
        "INPUT0": ("FP32", np.ones((2, 16), np.float32)),
        "INPUT1": ("FP32", np.ones((3, 16), np.float32)),
    }
    # Every input takes a batch (Triton's auto-complete: max_batch_size > 0): the batches must agree, as Triton
    # checks before its backend runs.
    with pytest.raises(InvalidInput, match="^input 'INPUT1' batch size does not match other inputs for 'simple'$"):
        await infer(model, mismatched)
    # Past that check, what ORT fails (here the broadcast) is the run's failure: INTERNAL.
    with pytest.raises(MeshError) as caught:
        model._run(["OUTPUT0"], {"INPUT0": np.ones((2, 16), np.float32), "INPUT1": np.ones((3, 16), np.float32)})
    assert caught.value.code == grpc.StatusCode.INTERNAL and "simple" in str(caught.value)
    # tensors.decode_inputs rejects wrong dtypes before ORT, so drive ORT's INVALID_ARGUMENT directly.
    with pytest.raises(InvalidInput, match="INVALID_ARGUMENT"):
        model._run(["OUTPUT0"], {"INPUT0": np.ones((1, 16)), "INPUT1": np.ones((1, 16))})


@pytest.mark.skipif(not HAS_PROC, reason="threads are counted in /proc")
async def test_sessions_share_one_thread_pool(runtime: OnnxRuntime, tmp_path: Path) -> None:
    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    model_dir = examples.write_mlp(tmp_path, "small", approx_bytes=8_000)
    await runtime.unload(await runtime.load(source(model_dir)))  # start the load worker
    before = threads()
    models = [await runtime.load(dataclasses.replace(source(model_dir), name=f"m{i}")) for i in range(200)]
    added = threads() - before
    # ORT's default options would start one intra-op thread per session (+200, see
    # shared/reference/dependencies.md).
    print(f"threads: {before} before, +{added} after 200 sessions")
    assert added <= 4
    for model in models:
        await runtime.unload(model)


@pytest.mark.skipif(not HAS_PROC, reason="threads are counted in /proc")
def test_more_intra_op_threads_share_the_global_pool(tmp_path: Path) -> None:
    # In a child process: ORT's global pool is a one-way switch that would refuse later
    # per-session-thread sessions in this test process.
    version_dir = examples.write_mlp(tmp_path, "small", approx_bytes=8_000) / "1"
    script = f"""
import asyncio, os
from pathlib import Path
import numpy as np
from meshnode.storage.repository import ModelSource
from meshnode.runtimes.onnx import OnnxRuntime

async def main():
    rt = OnnxRuntime(intra_op_threads=2)
    d = Path({str(version_dir)!r})
    await rt.unload(await rt.load(ModelSource("warm", "1", d, d / "model.onnx")))
    before = len(os.listdir("/proc/self/task"))
    models = [await rt.load(ModelSource(f"m{{i}}", "1", d, d / "model.onnx")) for i in range(100)]
    models[0]._run(["OUTPUT0"], {{"INPUT0": np.ones((1, 16), np.float32)}})
    print(len(os.listdir("/proc/self/task")) - before)
    await rt.close()

asyncio.run(main())
"""
    repo_root = Path(__file__).resolve().parents[4]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) <= 2


async def test_tiny_model_goes_inline_and_slow_one_stays_off_the_loop(runtime: OnnxRuntime, tmp_path: Path) -> None:
    tiny = await runtime.load(source(examples.write_mlp(tmp_path, "tiny", approx_bytes=8_000)))
    slow = await runtime.load(source(examples.write_matmul_chain(tmp_path, "slow")))
    assert not tiny.inline and not slow.inline  # unknown latency: off the loop
    tiny_in, slow_in = fp32(np.ones((1, 16))), fp32(np.ones((1, 256)))
    for _ in range(PROBE_RUNS):
        await infer(tiny, tiny_in)
        await infer(slow, slow_in)
    print(f"run EWMA: tiny {tiny.run_ewma_s * 1e6:.0f} us, slow {slow.run_ewma_s * 1e3:.2f} ms")
    assert tiny.inline
    assert not slow.inline


async def test_model_that_turns_slow_leaves_the_loop_and_comes_back(runtime: OnnxRuntime, tmp_path: Path) -> None:
    model = await runtime.load(source(examples.write_mlp(tmp_path, "mlp")))
    small = fp32(np.ones((1, 16)))
    for _ in range(PROBE_RUNS):
        await infer(model, small)
    assert model.inline
    await infer(model, fp32(np.ones((1024, 16))))  # ~100x the work of batch 1 (hidden width ~11.9k)
    assert not model.inline
    for _ in range(50):
        await infer(model, small)
        if model.inline:
            break
    assert model.inline


async def test_loading_a_large_model_does_not_stall_the_loop(
    runtime: OnnxRuntime, large_mlp: Path, tmp_path: Path
) -> None:
    await runtime.unload(await runtime.load(source(examples.write_mlp(tmp_path, "warm", approx_bytes=8_000))))
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    started = time.perf_counter()
    model = await runtime.load(source(large_mlp))
    load_s = time.perf_counter() - started
    done.set()
    await task
    stall_s = max(gaps) - 0.001
    print(
        f"50 MB load {load_s * 1e3:.0f} ms, max loop stall {stall_s * 1e3:.1f} ms, "
        f"size {model.size_bytes / 1e6:.1f} MB for a {file_size(large_mlp) / 1e6:.1f} MB file"
    )
    # Holding the GIL through session creation would stall the loop for most of load_s.
    assert stall_s < load_s / 4
    assert model.size_bytes >= file_size(large_mlp)
