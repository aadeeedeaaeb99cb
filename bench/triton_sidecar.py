"""tritonclient -> node (--runtime triton) -> Triton against tritonclient -> Triton directly, same model, same run.

Starts an etcd, a Triton (meshnode.triton_process, installed by `make triton`) on a repository holding a
1 MB MLP that ONNX Runtime runs inside a Python-backend model, and a node beside it using that Triton as its
runtime. One load generator process (bench.loadgen, stock tritonclient.grpc.aio) runs interleaved rounds of
c=1 latency and c=16 throughput against both paths, alternating which goes first. Prints medians, the
node/direct ratios and the issue's goal (c=1 p50 <= 1.15x direct). Everything it starts is stopped on exit,
error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.mesh_hop import Signals
from bench.procs import LoadGenProcess, cpu_seconds, rss_mb
from bench.report import _cell, _spread
from meshnode.etcd_process import EtcdProcess
from meshnode.node_process import NodeProcess
from meshnode.triton_examples import write_python_onnx_mlp
from meshnode.triton_process import TritonProcess

MODEL = "mlp"
IN_FEATURES = 16  # INPUT0 FP32 [-1, 16] -> OUTPUT0 FP32 [-1, 4], about 1 MB of weights
PATHS = ("direct", "node")
SLACK_S = 60.0  # on top of a phase's own bound before the load generator counts as stuck
P50_GOAL = 1.15
FIELDS = (  # key, label, phase, field
    ("p50_ms", "c=1 p50 latency, ms", "latency", "p50_ms"),
    ("p99_ms", "c=1 p99 latency, ms", "latency", "p99_ms"),
    ("rps", "c=16 throughput, req/s", "throughput", "rps"),
    ("c16_p50_ms", "c=16 p50 latency, ms", "throughput", "p50_ms"),
    ("server_cpu_us", "c=16 CPU of the path's servers, us/req", "throughput", "server_cpu_us_per_req"),
)
Json = dict[str, Any]
_log = functools.partial(print, "[triton_sidecar]", file=sys.stderr, flush=True)  # stdout is the result


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants now: Triton and its Python-backend stub processes."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as stat:
                parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
    tree, grown = {pid}, True
    while grown:
        found = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= found
        grown = bool(found)
    return sorted(tree)


def measure(loadgen: LoadGenProcess, pids: list[int], target: str, phase: str, args: argparse.Namespace) -> Json:
    """One phase on one path, with the CPU per request of every server process on that path."""
    cpu0 = [cpu_seconds(p) for p in pids]
    bound = args.requests * 0.1 if phase == "latency" else args.seconds
    answer = loadgen.run(bound + SLACK_S, op=phase, target=target, model=MODEL, requests=args.requests,
                         concurrency=args.concurrency, seconds=args.seconds)
    used = sum(cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True))
    answer["server_cpu_us_per_req"] = used * 1e6 / answer["requests"]
    return answer


def run_rounds(loadgen: LoadGenProcess, paths: dict[str, tuple[list[int], str]],
               args: argparse.Namespace) -> list[Json]:
    rounds = []
    for i in range(args.rounds):
        order = PATHS if i % 2 == 0 else PATHS[::-1]
        result: Json = {"order": list(order)}
        for path in order:
            pids, target = paths[path]
            result[path] = {phase: measure(loadgen, pids, target, phase, args) for phase in ("latency", "throughput")}
            lat, thr = result[path]["latency"], result[path]["throughput"]
            _log(f"round {i + 1}/{args.rounds} {path}: c=1 p50 {lat['p50_ms']:.3f} ms p99 {lat['p99_ms']:.3f} ms; "
                 f"c={args.concurrency} {thr['rps']:.0f} req/s, {thr['server_cpu_us_per_req']:.0f} us/req")
        rounds.append(result)
    return rounds


def summarize(rounds: list[Json]) -> Json:
    summary: Json = {key: {p: _spread([r[p][phase][field] for r in rounds]) for p in PATHS}
                     for key, _, phase, field in FIELDS}
    for key, _, _, _ in FIELDS:
        summary[key]["ratio"] = summary[key]["node"]["median"] / summary[key]["direct"]["median"]
    # Paired within a round: both paths then saw the same machine.
    paired = _spread([r["node"]["latency"]["p50_ms"] / r["direct"]["latency"]["p50_ms"] for r in rounds])
    summary["p50_ratio"] = {**paired, "goal": f"<= {P50_GOAL:.2f}x", "pass": paired["median"] <= P50_GOAL}
    summary["added_p50_ms"] = _spread([r["node"]["latency"]["p50_ms"] - r["direct"]["latency"]["p50_ms"]
                                       for r in rounds])
    return summary


def run(args: argparse.Namespace, signals: Signals) -> Json:
    config: Json = {k: getattr(args, k) for k in ("rounds", "requests", "seconds", "concurrency", "warmup")}
    config["loadavg_1m_before"] = os.getloadavg()[0]  # other work on the machine is the main noise
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshserve-triton-bench-")))
        repo = work / "models"
        config["model_mb"] = (write_python_onnx_mlp(repo, MODEL, in_features=IN_FEATURES) / "1" /
                              "model.onnx").stat().st_size / 1e6
        etcd = signals.start(stack, EtcdProcess.start, EtcdProcess.stop)
        triton = signals.start(stack, lambda: TritonProcess.start(repo), TritonProcess.stop)
        _log(f"etcd at {etcd.endpoint}, Triton at {triton.grpc_target}; starting the node")
        node = signals.start(stack, lambda: NodeProcess.start(
            etcd=etcd.endpoint, model_repository=repo, capacity="1GiB", metrics_port=None,
            extra_args=["--runtime", "triton", "--triton-url", triton.grpc_target,
                        "--triton-model-repository", str(repo), "--no-proactive-loads"]), NodeProcess.stop)
        loadgen = signals.start(stack, LoadGenProcess, LoadGenProcess.stop)
        try:
            # Through the node first: its first request loads the model in Triton, which then serves both paths.
            targets = {"node": node.target, "direct": triton.grpc_target}
            warm = {p: loadgen.run(SLACK_S * 2, op="warmup", target=targets[p], model=MODEL, requests=args.warmup)
                    for p in ("node", "direct")}
            direct_out, node_out = (np.asarray(warm[p]["outputs"]["OUTPUT0"]) for p in PATHS)
            if not np.array_equal(direct_out, node_out):
                raise RuntimeError(f"node and Triton disagree on the same input: {node_out} vs {direct_out}")
            triton_pids = process_tree(triton.pid)  # the model's stub exists from here on
            paths = {"direct": (triton_pids, triton.grpc_target), "node": ([node.process.pid, *triton_pids],
                                                                           node.target)}
            rounds = run_rounds(loadgen, paths, args)
            config["rss_mb"] = {"node": rss_mb(node.process.pid), "triton": sum(rss_mb(p) for p in triton_pids)}
        except Exception:
            _log("node log tail:\n" + node.log())
            _log("Triton log tail:\n" + triton.log_tail())
            raise
    config["loadavg_1m_after"] = os.getloadavg()[0]
    return {"config": config, "summary": summarize(rounds), "rounds": rounds}


def format_report(result: Json) -> str:
    c, s = result["config"], result["summary"]
    rows = [("metric", "direct: client -> Triton", "node: client -> node -> Triton", "node/direct")]
    rows += [(label, _cell(s[key]["direct"]), _cell(s[key]["node"]), f"{s[key]['ratio']:.2f}x")
             for key, label, _, _ in FIELDS]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    ratio = s["p50_ratio"]
    lines = [f"node beside Triton vs Triton directly: {c['model_mb']:.2f} MB MLP in ONNX Runtime in a Python-backend "
             f"model; {c['rounds']} interleaved rounds, c=1 {c['requests']} requests, c={c['concurrency']} "
             f"{c['seconds']:g} s; medians (min-max over rounds); 1-min load average {c['loadavg_1m_before']:.1f} "
             f"before, {c['loadavg_1m_after']:.1f} after", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines += ["", f"c=1 p50 node/direct, paired per round: {_cell(ratio)}x  goal {ratio['goal']}  "
              f"{'PASS' if ratio['pass'] else 'MISS'}; the node adds {_cell(s['added_p50_ms'])} ms",
              f"RSS after the rounds: node {c['rss_mb']['node']:.0f} MB, Triton with the model's stub "
              f"{c['rss_mb']['triton']:.0f} MB"]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.triton_sidecar", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--rounds", type=int, default=6, help="interleaved rounds; even, so each path goes first as often")
    add("--seconds", type=float, default=3.0, help="c=16 duration per round and path (default 3)")
    add("--requests", type=int, default=1000, help="c=1 requests per round and path (default 1000)")
    add("--concurrency", type=int, default=16, help="callers in the throughput phase")
    add("--warmup", type=int, default=300, help="requests per path before measuring")
    add("--quick", action="store_true", help="tiny counts for a smoke test (noise)")
    add("--json", action="store_true", help="print JSON instead of the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        vars(args).update(rounds=1, seconds=1.0, requests=100, warmup=20)
    try:
        result = run(args, Signals())
    except KeyboardInterrupt:
        _log("interrupted; everything it started is stopped")
        return 130
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
