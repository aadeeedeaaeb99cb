"""`make demo`: an etcd and a node on loopback, example models, tritonclient traffic, a report.

Everything it starts is stopped at the end, also on Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from meshnode.etcd_process import EtcdProcess
from meshnode.examples import mlp_reference, write_add_sub, write_identity, write_mlp
from meshnode.node_process import NodeProcess

TENANTS = 6  # per-tenant models, more than the node's capacity holds at once


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


def _timed(fn: object, *args: object, **kwargs: object) -> tuple[object, float]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)  # type: ignore[operator]
    return result, (time.perf_counter() - started) * 1000.0


def _traffic(client: grpcclient.InferenceServerClient, repo: Path) -> list[str]:
    lines = []
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)
    inp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    for i in range(TENANTS):
        result, cold_ms = _timed(client.infer, f"tenant-{i}", [inp])
        answer = result.as_numpy("OUTPUT0")  # type: ignore[attr-defined]
        ok = np.allclose(answer, mlp_reference(repo / f"tenant-{i}", x), rtol=1e-4, atol=1e-5)
        warm = [_timed(client.infer, f"tenant-{i}", [inp])[1] for _ in range(200)]
        lines.append(f"  tenant-{i}: OUTPUT0={np.array2string(answer[0], precision=3)} {'correct' if ok else 'WRONG'}; "
                     f"first request {cold_ms:.1f} ms (load), then p50 {statistics.median(warm):.2f} ms "
                     f"p99 {np.percentile(warm, 99):.2f} ms")
    a = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    b = grpcclient.InferInput("INPUT1", [1, 16], "FP32")
    a.set_data_from_numpy(np.full((1, 16), 5, np.float32))
    b.set_data_from_numpy(np.full((1, 16), 3, np.float32))
    simple = client.infer("simple", [a, b])
    lines.append(f"  simple: 5+3={simple.as_numpy('OUTPUT0')[0, 0]:g}, 5-3={simple.as_numpy('OUTPUT1')[0, 0]:g}")
    text = grpcclient.InferInput("INPUT0", [1, 16], "BYTES")
    text.set_data_from_numpy(np.array([[f"hello {i}".encode() for i in range(16)]], dtype=np.object_))
    echoed = client.infer("echo-text", [text]).as_numpy("OUTPUT0")[0, :2]
    lines.append(f"  echo-text: {[v.decode() for v in echoed]} ...")
    return lines


def run(capacity: str) -> None:
    with tempfile.TemporaryDirectory(prefix="meshserve-demo-") as tmp:
        repo = Path(tmp) / "models"
        _write_models(repo)
        etcd = EtcdProcess.start()
        node = None
        try:
            node = NodeProcess.start(etcd=etcd.endpoint, model_repository=repo, capacity=capacity,
                                     log_file=Path(tmp) / "node.log")
            print(f"etcd at {etcd.endpoint}; node at {node.target} (capacity {capacity}), "
                  f"metrics at http://127.0.0.1:{node.metrics_port}/metrics\n")
            with grpcclient.InferenceServerClient(node.target) as client:
                print("Answers, through tritonclient:")
                print("\n".join(_traffic(client, repo)))
                print("\nRepository index (state on this node):")
                for m in client.get_model_repository_index().models:
                    print(f"  {m.name:<10} version={m.version or '-':<2} state={m.state or '(not loaded)':<13} "
                          f"{m.reason}")
            m = _metrics(node)
            loads = m["modelmesh_loadmodel_milliseconds_count"]
            print("\nCache:")
            print(f"  requests {m['modelmesh_invoke_model_milliseconds_count']:.0f}, hits "
                  f"{m['modelmesh_cache_hit_total']:.0f}, misses {m['modelmesh_cache_miss_total']:.0f}, "
                  f"loads {m['modelmesh_loadmodel_total']:.0f}, evictions {m['modelmesh_evictions_total']:.0f}")
            print(f"  used {m['modelmesh_instance_used_bytes'] / 2**20:.1f} MiB of "
                  f"{m['modelmesh_instance_capacity_bytes'] / 2**20:.1f} MiB, "
                  f"{m['modelmesh_instance_models_total']:.0f} models loaded; mean load "
                  f"{m['modelmesh_loadmodel_milliseconds_sum'] / max(1, loads):.1f} ms")
        finally:
            if node is not None:
                node.stop()
            etcd.stop()
    print("\nStopped the node and etcd.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--capacity", default="4MiB", help="node capacity (default 4MiB: forces evictions)")
    run(parser.parse_args().capacity)


if __name__ == "__main__":
    main()
