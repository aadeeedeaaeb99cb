"""`make demo`: a three-node mesh on loopback, example models, tritonclient traffic, an alias switch,
a fourth node beside a Triton server joining the mesh, and a report.

Uses `meshserve local`'s launcher; everything it starts is stopped at the end, also on error.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from deploy.local.models import mlp_reference, write_add_sub, write_identity, write_mlp
from deploy.local.triton_models import write_python_add_sub
from meshnode.local.mesh import LocalMesh
from meshnode.local.node import NodeProcess
from meshnode.local.triton import TritonProcess

TENANTS = 9  # per-tenant models: more than one node's capacity holds at once


def _write_models(repo: Path) -> None:
    for i in range(TENANTS):
        write_mlp(repo, f"tenant-{i}", approx_bytes=1_000_000, seed=i)
    write_add_sub(repo, "simple")
    write_identity(repo, "echo-text", "BYTES")


def _metrics(node: NodeProcess) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(modelmesh_\w+)(?:\{[^}]*\})? (\S+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def _ms(fn: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - started) * 1000.0


def _traffic(mesh: LocalMesh, repo: Path) -> list[str]:
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)
    inp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    clients = [grpcclient.InferenceServerClient(t) for t in mesh.targets()]
    lines = []
    try:
        for i in range(TENANTS):
            name = f"tenant-{i}"
            first = clients[i % 3]
            answer = first.infer(name, [inp]).as_numpy("OUTPUT0")
            ok = np.allclose(answer, mlp_reference(repo / name, x), rtol=1e-4, atol=1e-5)
            # The same model through every node: one copy serves them all (local or one hop).
            warm = [_ms(c.infer, name, [inp]) for _ in range(60) for c in clients]
            lines.append(f"  {name}: {np.array2string(answer[0], precision=3)} {'correct' if ok else 'WRONG'}; "
                         f"through all 3 nodes p50 {statistics.median(warm):.2f} ms, "
                         f"p99 {np.percentile(warm, 99):.2f} ms")
        a, b = grpcclient.InferInput("INPUT0", [1, 16], "FP32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")
        a.set_data_from_numpy(np.full((1, 16), 5, np.float32))
        b.set_data_from_numpy(np.full((1, 16), 3, np.float32))
        simple = clients[1].infer("simple", [a, b])
        lines.append(f"  simple: 5+3={simple.as_numpy('OUTPUT0')[0, 0]:g}, 5-3={simple.as_numpy('OUTPUT1')[0, 0]:g}")
        text = grpcclient.InferInput("INPUT0", [1, 16], "BYTES")
        text.set_data_from_numpy(np.array([[f"hello {i}".encode() for i in range(16)]], dtype=np.object_))
        echoed = clients[2].infer("echo-text", [text]).as_numpy("OUTPUT0")[0, :2]
        lines.append(f"  echo-text: {[v.decode() for v in echoed]} ...")
        lines.append("\nWhere the models are (RepositoryIndex through node-0):")
        for m in clients[0].get_model_repository_index().models:
            lines.append(f"  {m.name:<10} {m.state or '(not loaded)':<13} {m.reason}")
    finally:
        for client in clients:
            client.close()
    return lines


def _command(mesh: LocalMesh, *args: str) -> str:
    """`meshserve ARGS --target <node-1>`: the command line a person would type."""
    done = subprocess.run([sys.executable, "-m", "meshnode", *args, "--target", mesh.targets()[1]],
                          capture_output=True, text=True, timeout=300)
    text = done.stdout if done.returncode == 0 else f"failed: {done.stderr}"
    return "\n".join("  " + line for line in text.strip().splitlines())


def _alias_switch(mesh: LocalMesh) -> list[str]:
    x = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32))
    lines = ["$ meshserve aliases set fraud tenant-0", _command(mesh, "aliases", "set", "fraud", "tenant-0")]
    with grpcclient.InferenceServerClient(mesh.targets()[2]) as client:
        before = client.infer("fraud", [x]).get_response().model_name
        lines.append(f"  a request for 'fraud' through node-2 is answered by {before}")
        lines += ["$ meshserve aliases set fraud tenant-1   # loads tenant-1 first, then switches",
                  _command(mesh, "aliases", "set", "fraud", "tenant-1")]
        after = client.infer("fraud", [x]).get_response().model_name
        lines.append(f"  a request for 'fraud' through node-2 is answered by {after}")
    return lines


def _beside_triton(mesh: LocalMesh, work: Path, capacity: str) -> list[str]:
    """A fourth node, beside a Triton server, joins the mesh; a Triton model is asked for through node-0."""
    repo = work / "triton-models"
    write_python_add_sub(repo, "triton-add")
    with TritonProcess.start(repo) as triton:
        node = NodeProcess.start(
            etcd=mesh.etcd.endpoint, model_repository=repo, capacity=capacity, instance_id="node-triton",
            extra_args=["--runtime", "triton", "--triton-url", triton.grpc_target,
                        "--triton-model-repository", str(repo)], log_file=work / "node-triton.log")
        try:
            a, b = (grpcclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1"))
            a.set_data_from_numpy(np.full((1, 16), 5, np.float32))
            b.set_data_from_numpy(np.full((1, 16), 3, np.float32))
            with grpcclient.InferenceServerClient(mesh.targets()[0]) as client:
                started = time.perf_counter()
                first = client.infer("triton-add", [a, b])
                cold_ms = (time.perf_counter() - started) * 1000.0
                warm = [_ms(client.infer, "triton-add", [a, b]) for _ in range(50)]
            return [f"  Triton {triton.grpc_target} with a Python-backend model; node-triton beside it joined the mesh",
                    f"  triton-add through node-0 (ONNX Runtime): 5+3={first.as_numpy('OUTPUT0')[0, 0]:g}, "
                    f"5-3={first.as_numpy('OUTPUT1')[0, 0]:g}; first request {cold_ms:.0f} ms (loaded in Triton), "
                    f"then p50 {statistics.median(warm):.2f} ms (node-0 -> node-triton -> Triton)",
                    "$ meshserve nodes", _command(mesh, "nodes")]
        finally:
            node.stop()


def run(capacity: str) -> None:
    with tempfile.TemporaryDirectory(prefix="meshserve-demo-") as tmp:
        repo = Path(tmp) / "models"
        _write_models(repo)
        with LocalMesh.start(nodes=3, model_repository=repo, capacity=capacity, log_dir=Path(tmp)) as mesh:
            print(f"A three-node mesh on loopback (each node's capacity {capacity}):")
            print(mesh.describe().replace(tmp, "<tmp>"), "\n")
            print("Answers through tritonclient, each model asked through every node:")
            print("\n".join(_traffic(mesh, repo)))
            print("\nAn alias, switched from one model to another:")
            print("\n".join(_alias_switch(mesh)))
            print("\nTriton as a runtime, in the same mesh:")
            print("\n".join(_beside_triton(mesh, Path(tmp), "1GiB")))
            print("\nPer node:")
            for node in mesh.nodes:
                m = _metrics(node)
                forwarded = m["modelmesh_api_request_total"] - m["modelmesh_invoke_model_total"]
                print(f"  {node.instance_id}: {m['modelmesh_api_request_total']:.0f} requests in, "
                      f"{m['modelmesh_invoke_model_total']:.0f} served here, {forwarded:.0f} forwarded; "
                      f"loads {m['modelmesh_loadmodel_total']:.0f}, evictions {m['modelmesh_evictions_total']:.0f}; "
                      f"{m['modelmesh_instance_models_total']:.0f} models, "
                      f"{m['modelmesh_instance_used_bytes'] / 2**20:.1f} of "
                      f"{m['modelmesh_instance_capacity_bytes'] / 2**20:.0f} MiB used")
    print("\nStopped the nodes and etcd.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--capacity", default="8MiB", help="each node's capacity (default 8MiB)")
    run(parser.parse_args().capacity)


if __name__ == "__main__":
    main()
