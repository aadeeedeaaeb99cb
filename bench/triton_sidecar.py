"""tritonclient -> Triton directly, -> a bare Python gRPC proxy -> Triton, and -> node (--runtime triton) -> Triton.

Starts an etcd, a Triton (meshnode.local.triton, installed by `make triton`) on a repository holding a
1 MB MLP that ONNX Runtime runs inside a Python-backend model, a node beside it using that Triton as its
runtime, and bench.proxy (a byte-passthrough grpc.aio proxy: the floor of any Python gRPC hop) in front of
the same Triton. One load generator process (bench.loadgen, stock tritonclient.grpc.aio) runs interleaved
rounds of c=1 latency and c=16 throughput on the three paths, rotating which goes first. Prints medians,
node/direct (the issue's goal: c=1 p50 <= 1.15x), proxy/direct, and the node's extra cost over the bare hop,
(node - direct) / (proxy - direct). Everything it starts is stopped on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench import report
from bench.procs import SLACK_S, LoadGenProcess, Route, Signals, rss_mb, run_rounds
from bench.proxy import ProxyProcess
from bench.report import PATH_FIELDS, cell, spread, summarize_paths, table
from deploy.local.triton_models import write_python_onnx_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from meshnode.local.triton import TritonProcess

MODEL = "mlp"
IN_FEATURES = 16  # INPUT0 FP32 [-1, 16] -> OUTPUT0 FP32 [-1, 4], about 1 MB of weights
PATHS = {"direct": "client -> Triton", "proxy": "client -> bare proxy -> Triton",
         "node": "client -> node -> Triton"}
P50_GOAL = 1.15
# The ratios are read for every figure but the hop's own CPU (the direct path has no hop). For throughput,
# more is better: a bare hop's "cost" there is the throughput it loses, which the sign test below respects.
RATIO_KEYS = [key for key, _, _, _ in PATH_FIELDS if key != "hop_cpu_us"]
MORE_IS_BETTER = {"rps"}
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


def summarize(rounds: list[Json]) -> Json:
    """Spreads per path, and per figure the ratios paired within each round (all paths then saw the same
    machine): node/direct, proxy/direct and the node's extra over the bare hop's, (node - d) / (proxy - d)."""
    summary = summarize_paths(rounds, PATHS)
    for key, _, phase, field in PATH_FIELDS:
        if key not in RATIO_KEYS:
            continue
        values = [{p: r[p][phase][field] for p in PATHS} for r in rounds]
        sign = -1 if key in MORE_IS_BETTER else 1
        summary[key] |= {
            "node/direct": spread([v["node"] / v["direct"] for v in values]),
            "proxy/direct": spread([v["proxy"] / v["direct"] for v in values]),
            # A round where the bare hop measured free or better than direct (noise) has no such ratio.
            "extra": spread([(v["node"] - v["direct"]) / (v["proxy"] - v["direct"]) for v in values
                             if (v["proxy"] - v["direct"]) * sign > 0] or [float("nan")]),
        }
    # The hop's own CPU: direct has none (zero), so the same extra-cost ratio is node's over the proxy's.
    hops = [{p: r[p]["throughput"]["hop_cpu_us_per_req"] for p in ("proxy", "node")} for r in rounds]
    summary["hop_cpu_us"]["extra"] = spread([h["node"] / h["proxy"] for h in hops])
    paired = summary["p50_ms"]["node/direct"]
    summary["p50_ratio"] = {**paired, "goal": f"<= {P50_GOAL:.2f}x", "pass": paired["median"] <= P50_GOAL}
    summary["added_p50_ms"] = {p: spread([r[p]["latency"]["p50_ms"] - r["direct"]["latency"]["p50_ms"]
                                          for r in rounds]) for p in ("proxy", "node")}
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
            etcd=etcd.endpoint, model_repository=repo, capacity="1GiB", metrics_port=0,
            extra_args=["--runtime", "triton", "--triton-url", triton.grpc_target,
                        "--triton-model-repository", str(repo), "--no-proactive-loads"]), NodeProcess.stop)
        proxy = signals.start(stack, lambda: ProxyProcess(triton.grpc_target), ProxyProcess.stop)
        loadgen = signals.start(stack, LoadGenProcess, LoadGenProcess.stop)
        try:
            # Through the node first: its first request loads the model in Triton, which then serves every path.
            targets = {"node": node.target, "direct": triton.grpc_target, "proxy": proxy.target}
            warm = {p: loadgen.run(SLACK_S * 2, op="warmup", target=t, model=MODEL, requests=args.warmup)
                    for p, t in targets.items()}
            outputs = {p: np.asarray(w["outputs"]["OUTPUT0"]) for p, w in warm.items()}
            if not all(np.array_equal(outputs["direct"], o) for o in outputs.values()):
                raise RuntimeError(f"the paths disagree on the same input: {outputs}")
            triton_pids = process_tree(triton.pid)  # the model's stub exists from here on
            paths = {"direct": Route(triton.grpc_target, triton_pids),
                     "proxy": Route(proxy.target, triton_pids, proxy.pid),
                     "node": Route(node.target, triton_pids, node.process.pid)}
            rounds = run_rounds(loadgen, paths, MODEL, args, _log)
            config["rss_mb"] = {"node": rss_mb(node.process.pid), "proxy": rss_mb(proxy.pid),
                                "triton": sum(rss_mb(p) for p in triton_pids)}
        except Exception:
            _log("node log tail:\n" + node.log())
            _log("Triton log tail:\n" + triton.log_tail())
            raise
    config["loadavg_1m_after"] = os.getloadavg()[0]
    return {"config": config, "summary": summarize(rounds), "rounds": rounds}


def format_report(result: Json) -> str:
    c, s = result["config"], result["summary"]

    def ratio(key: str, which: str) -> str:
        return f"{s[key][which]['median']:.2f}x" if which in s[key] else "-"

    rows = [("metric", *PATHS, "proxy/direct", "node/direct", "(node-direct)/(proxy-direct)")]
    rows += [(label, *(cell(s[key][p]) if p in s[key] else "-" for p in PATHS),
              ratio(key, "proxy/direct"), ratio(key, "node/direct"), ratio(key, "extra"))
             for key, label, _, _ in PATH_FIELDS]
    goal, added = s["p50_ratio"], s["added_p50_ms"]
    lines = [f"node beside Triton vs a bare Python gRPC proxy vs Triton directly: {c['model_mb']:.2f} MB MLP in ONNX "
             f"Runtime in a Python-backend model; {c['rounds']} interleaved rounds, c=1 {c['requests']} requests, "
             f"c={c['concurrency']} {c['seconds']:g} s; medians (min-max over rounds), ratios paired per round; "
             f"1-min load average {c['loadavg_1m_before']:.1f} before, {c['loadavg_1m_after']:.1f} after",
             "paths: " + "; ".join(f"{p}: {label}" for p, label in PATHS.items()), ""]
    lines += table(rows)
    lines += ["", f"c=1 p50 node/direct: {cell(goal)}x  goal {goal['goal']}  {'PASS' if goal['pass'] else 'MISS'}; "
              f"over direct the bare proxy adds {cell(added['proxy'])} ms, the node {cell(added['node'])} ms",
              f"the node's cost over the floor of any Python gRPC hop, (node - direct) / (proxy - direct): c=1 p50 "
              f"{cell(s['p50_ms']['extra'])}x, c=16 throughput lost {cell(s['rps']['extra'])}x, CPU per request "
              f"{cell(s['server_cpu_us']['extra'])}x",
              f"RSS after the rounds: node {c['rss_mb']['node']:.0f} MB, proxy {c['rss_mb']['proxy']:.0f} MB, Triton "
              f"with the model's stub {c['rss_mb']['triton']:.0f} MB"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = report.options("python -m bench.triton_sidecar", __doc__.splitlines()[0],
                            "interleaved rounds; a multiple of 3 rotates the order fairly")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(report.QUICK)
    return report.main(args, lambda: run(args, Signals()), format_report, _log)


if __name__ == "__main__":
    sys.exit(main())
