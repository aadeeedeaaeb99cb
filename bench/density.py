"""Density: a mesh of three nodes over one etcd serving N registered models, against the same mesh with 10.

`.venv/bin/python -m bench.density --models 100000` builds a repository of N models (symlinks to one small
ONNX model), starts etcd and three nodes on it, and prints, for 10 models (the floor, same run) and for N:
- ready time of each node at first start (node-0 registers the repository for the mesh, in the background),
  seconds until every model is registered, ready time after a restart of node-1, and how many times a lease
  expired while nodes started (goal: 0);
- bytes of node memory per registered model: (RSS with N - RSS with 10) / (N - 10), mean of the nodes;
- etcd's keys under the mesh's prefix and its database size;
- p50 latency of the first (cold: loaded just in time) and later (warm) requests to random models, and
  their ratio to the floor's (goal: the same within noise);
- seconds to page through ListModels by a prefix, and to fetch RepositoryIndex of everything;
- etcd writes per node per second: idle, while loading (the cold requests), and at steady load (a load
  generator per node on loaded models).
Every process it starts is stopped on the way out. `--json` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import density_probe as probe
from bench.procs import LoadGenProcess
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess

FLOOR = 10
NODES = 3
READY_TIMEOUT_S = 900.0
CAPACITY = "512MiB"


class Mesh:
    """Three nodes of one mesh on `repo`, started and restarted as the bench says; `stop` ends them all."""

    def __init__(self, etcd: EtcdProcess, repo: Path, logs: Path, prefix: str) -> None:
        self.etcd, self.repo, self.prefix = etcd, repo, prefix
        self.logs = [logs / f"{prefix}-node-{i}.log" for i in range(NODES)]
        self.nodes: list[NodeProcess] = []

    def start(self, i: int) -> float:
        """Start node i; seconds until it printed its ready line."""
        started = time.monotonic()
        node = NodeProcess.start(etcd=self.etcd.endpoint, model_repository=self.repo, capacity=CAPACITY,
                                 etcd_prefix=self.prefix, instance_id=f"node-{i}", log_file=self.logs[i],
                                 timeout_s=READY_TIMEOUT_S)
        ready_s = time.monotonic() - started
        if i < len(self.nodes):
            self.nodes[i] = node
        else:
            self.nodes.append(node)
        return ready_s

    def restart(self, i: int) -> float:
        self.nodes[i].stop(timeout_s=60.0)
        return self.start(i)

    def writes(self) -> list[int]:
        return [probe.etcd_writes(n) for n in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()


def writes_per_node_s(mesh: Mesh, action: Any) -> tuple[float, Any]:
    """etcd writes per node per second while `action()` runs, and what it returned."""
    before, started = mesh.writes(), time.monotonic()
    result = action()
    elapsed = time.monotonic() - started
    after = mesh.writes()
    return statistics.mean((a - b) / elapsed for a, b in zip(after, before, strict=True)), result


def steady_load(mesh: Mesh, models: list[str], seconds: float) -> float:
    """A load generator per node, each on a model loaded there, for `seconds`: requests per second in all."""
    rates: list[float] = []
    gens = [LoadGenProcess() for _ in mesh.nodes]
    try:
        for gen, node, model in zip(gens, mesh.nodes, models, strict=False):
            gen.run(120, op="warmup", target=node.target, model=model, requests=20)

        def drive(gen: LoadGenProcess, target: str, model: str) -> None:
            rates.append(gen.run(seconds + 60, op="throughput", target=target, model=model, concurrency=8,
                                 seconds=seconds)["rps"])

        threads = [threading.Thread(target=drive, args=(g, n.target, m))
                   for g, n, m in zip(gens, mesh.nodes, models, strict=False)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for gen in gens:
            gen.stop()
    return sum(rates)


def measure(etcd: EtcdProcess, work: Path, count: int, args: argparse.Namespace) -> dict[str, Any]:
    built = time.monotonic()
    repo = probe.build_repository(work, count)
    result: dict[str, Any] = {"models": count, "repository_build_s": time.monotonic() - built}
    mesh = Mesh(etcd, repo, work, f"density-{count}")
    try:
        started = time.monotonic()
        result["first_start_ready_s"] = [mesh.start(i) for i in range(NODES)]
        # node-0 registers the repository in the background (the others take part when they find it unfinished).
        result["registered_s"] = probe.wait_registered(etcd.endpoint, mesh.prefix, count, mesh.logs,
                                                      READY_TIMEOUT_S) - started
        idle, _ = writes_per_node_s(mesh, lambda: time.sleep(args.idle_seconds))
        result["etcd_writes_per_node_s_idle"] = idle
        result["rss_bytes"] = [probe.rss_bytes(n.process.pid) for n in mesh.nodes]
        result["restart_ready_s"] = mesh.restart(1)
        targets = [n.target for n in mesh.nodes]
        models = probe.random_models(count, args.sample, random.Random(count))
        loading, result["latency"] = writes_per_node_s(mesh, lambda: probe.latencies(targets, models))
        result["etcd_writes_per_node_s_loading"] = loading
        steady, rps = writes_per_node_s(mesh, lambda: steady_load(mesh, models, args.load_seconds))
        result["etcd_writes_per_node_s_steady"], result["steady_rps"] = steady, rps
        result["listing"] = probe.listing_times(targets[0], "m000")
        result.update(probe.etcd_usage(etcd.endpoint, mesh.prefix))
    finally:
        mesh.stop()
    result["lease_expiries"] = probe.lease_losses(mesh.logs)
    return result


def summary(floor: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any]:
    per_model = (statistics.mean(dense["rss_bytes"]) - statistics.mean(floor["rss_bytes"])) / (
        dense["models"] - floor["models"])
    return {
        "bytes_per_model": per_model,
        "cold_vs_floor": dense["latency"]["cold_p50_ms"] / floor["latency"]["cold_p50_ms"],
        "warm_vs_floor": dense["latency"]["warm_p50_ms"] / floor["latency"]["warm_p50_ms"],
    }


def table(floor: dict[str, Any], dense: dict[str, Any], ratios: dict[str, Any]) -> str:
    def row(label: str, key: Any) -> str:
        return f"| {label} | {key(floor)} | {key(dense)} |"

    def seconds(values: list[float]) -> str:
        return " / ".join(f"{v:.1f}" for v in values)

    return "\n".join([
        f"| | {floor['models']:,} models | {dense['models']:,} models |", "|---|---|---|",
        row("ready at first start, s (node-0 registers)", lambda r: seconds(r["first_start_ready_s"])),
        row("all registered, s after node-0 started", lambda r: f"{r['registered_s']:.1f}"),
        row("ready after a restart, s", lambda r: f"{r['restart_ready_s']:.1f}"),
        row("lease expiries while starting", lambda r: r["lease_expiries"]),
        row("node RSS, MB (mean)", lambda r: f"{statistics.mean(r['rss_bytes']) / 2**20:.0f}"),
        row("etcd keys / db size MB", lambda r: f"{r['etcd_keys']:,} / {r['etcd_db_bytes'] / 2**20:.1f}"),
        row("cold p50 ms", lambda r: f"{r['latency']['cold_p50_ms']:.1f}"),
        row("warm p50 ms", lambda r: f"{r['latency']['warm_p50_ms']:.2f}"),
        row("ListModels by prefix 'm000', s (models)",
            lambda r: f"{r['listing']['list_prefix_s']:.2f} ({r['listing']['listed_by_prefix']:,})"),
        row("RepositoryIndex of all, s", lambda r: f"{r['listing']['index_s']:.2f}"),
        row("etcd writes/node/s idle", lambda r: f"{r['etcd_writes_per_node_s_idle']:.2f}"),
        row("etcd writes/node/s loading", lambda r: f"{r['etcd_writes_per_node_s_loading']:.2f}"),
        row("etcd writes/node/s steady (req/s)",
            lambda r: f"{r['etcd_writes_per_node_s_steady']:.2f} ({r['steady_rps']:.0f})"),
        "",
        f"bytes per registered model: {ratios['bytes_per_model']:.0f} (goal <= 500); "
        f"cold/floor {ratios['cold_vs_floor']:.2f}x, warm/floor {ratios['warm_vs_floor']:.2f}x",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=30, help="random models asked, cold then warm")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--load-seconds", type=float, default=10.0)
    parser.add_argument("--logs", type=Path, help="keep the nodes' logs here (default: removed with the run)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="density-") as tmp:
        work = Path(tmp)
        etcd = EtcdProcess.start()
        try:
            floor = measure(etcd, work / "floor", FLOOR, args)
            dense = measure(etcd, work / "dense", args.models, args)
        finally:
            etcd.stop()
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log in work.glob("*/*.log"):
                    shutil.copy(log, args.logs / log.name)
    ratios = summary(floor, dense)
    print(json.dumps({"floor": floor, "dense": dense, **ratios}, indent=1) if args.json
          else table(floor, dense, ratios))


if __name__ == "__main__":
    main()
