"""`python -m bench.hot_path`: the node's local hit against both floors and Triton, in one run, one table.

On one 1 MB MLP (ONNX Runtime, one intra-op thread everywhere): the floor on grpc.aio (bench.floor), the
floor on grpcio's threaded server with ModelInfer off its C core (`--threads`, as the node's threaded server),
a meshserve node's local hit on each of its gRPC servers
(`--grpc-server aio` and `threaded`), and Triton's C++ front end with the model in a Python-backend stub running
ONNX Runtime (meshnode.local.triton, `make triton`). One load
generator process (bench.loadgen, stock tritonclient.grpc.aio) runs interleaved rounds of c=1 latency and c=16
throughput on every path, rotating which goes first. `--pin` puts the servers on CPU 0 and the load generator
on CPU 1 (measures the servers); Triton's CPU counts its stub process. Prints medians, each path's ratio to
Triton paired per round, and issue 19's goals for each node: c=16 throughput >= 1.10x Triton's, CPU per
request <= 0.90x, c=1 p50 <= 1.00x. Everything it starts is stopped on exit, error, Ctrl-C or SIGTERM.
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
import tritonclient.grpc as triton_client

from bench import report
from bench.procs import SLACK_S, FloorProcess, LoadGenProcess, Route, Signals, pin, rss_mb, run_rounds
from bench.report import PATH_FIELDS, cell, spread, summarize_paths, table
from bench.triton_sidecar import process_tree
from deploy.local.models import write_mlp
from deploy.local.triton_models import write_python_onnx_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from meshnode.local.triton import TritonProcess

MODEL = "mlp"
FLOOR_THREADS = 8  # the threaded floor's polling threads at most, as in ../shared/reference/peers-measured.md
IN_FEATURES = 16  # INPUT0 FP32 [-1, 16] -> OUTPUT0 FP32 [-1, 4], about 1 MB of weights
PATHS = {"floor": "grpc.aio floor", "threaded": "threaded floor", "node": "node (grpc.aio)",
         "node_threaded": "node (threaded)", "triton": "Triton, Python-backend ORT"}
NODES = {"node": "aio", "node_threaded": "threaded"}  # path -> --grpc-server
# Issue 19's goals, node/Triton: (figure, comparison, bound)
GOALS = (("rps", ">=", 1.10), ("server_cpu_us", "<=", 0.90), ("p50_ms", "<=", 1.00))
SERVER_CPUS, LOADGEN_CPUS = {0}, {1}
Json = dict[str, Any]
_log = functools.partial(print, "[hot_path]", file=sys.stderr, flush=True)  # stdout is the result


def summarize(rounds: list[Json]) -> Json:
    summary = summarize_paths(rounds, PATHS)
    for key, _, phase, field in PATH_FIELDS:
        if key in summary and "triton" in summary[key]:
            summary[key]["vs_triton"] = {p: spread([r[p][phase][field] / r["triton"][phase][field] for r in rounds])
                                         for p in PATHS if p in summary[key]}
    summary["goals"] = [{"path": path, "figure": key, "goal": f"{op} {bound:.2f}x", "ratio": ratio,
                         "pass": ratio["median"] >= bound if op == ">=" else ratio["median"] <= bound}
                        for path in NODES for key, op, bound in GOALS
                        for ratio in (summary[key]["vs_triton"][path],)]
    return summary


def run(args: argparse.Namespace, signals: Signals) -> Json:
    config: Json = {k: getattr(args, k) for k in ("rounds", "requests", "seconds", "concurrency", "warmup", "pin")}
    config["loadavg_1m_before"] = os.getloadavg()[0]  # other work on the machine is the main noise
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshserve-hot-path-")))
        model_file = write_mlp(work / "models", MODEL, in_features=IN_FEATURES) / "1" / "model.onnx"
        write_python_onnx_mlp(work / "triton", MODEL, in_features=IN_FEATURES)
        config["model_mb"] = model_file.stat().st_size / 1e6
        etcd = signals.start(stack, EtcdProcess.start, EtcdProcess.stop)
        triton = signals.start(stack, lambda: TritonProcess.start(work / "triton"), TritonProcess.stop)
        nodes = {path: signals.start(stack, functools.partial(
            NodeProcess.start, etcd=etcd.endpoint, model_repository=work / "models", capacity="1GiB", metrics_port=0,
            etcd_prefix=path, extra_args=["--grpc-server", server]), NodeProcess.stop)
            for path, server in NODES.items()}
        floor = signals.start(stack, lambda: FloorProcess(model_file, MODEL), FloorProcess.stop)
        threaded = signals.start(stack, lambda: FloorProcess(model_file, MODEL, threads=FLOOR_THREADS),
                                 FloorProcess.stop)
        loadgen = signals.start(stack, LoadGenProcess, LoadGenProcess.stop)
        try:
            with triton_client.InferenceServerClient(triton.grpc_target) as client:
                client.load_model(MODEL)  # Triton starts in explicit model control
            targets = {"floor": floor.target, "threaded": threaded.target, "triton": triton.grpc_target,
                       **{path: node.target for path, node in nodes.items()}}
            warm = {p: loadgen.run(SLACK_S * 2, op="warmup", target=t, model=MODEL, requests=args.warmup)
                    for p, t in targets.items()}
            outputs = {p: np.asarray(w["outputs"]["OUTPUT0"]) for p, w in warm.items()}
            if not all(np.allclose(outputs["floor"], o, rtol=1e-5, atol=1e-6) for o in outputs.values()):
                raise RuntimeError(f"the paths disagree on the same input: {outputs}")
            pids = {"floor": [floor.pid], "threaded": [threaded.pid], "triton": process_tree(triton.pid),
                    **{path: [node.process.pid] for path, node in nodes.items()}}  # Triton's stub: from its load
            if args.pin:
                for tree in pids.values():
                    for pid in tree:
                        pin(pid, SERVER_CPUS)
                pin(loadgen.pid, LOADGEN_CPUS)
                pin(os.getpid(), SERVER_CPUS)  # the bench itself only waits
            rounds = run_rounds(loadgen, {p: Route(targets[p], pids[p]) for p in PATHS}, MODEL, args, _log)
            config["rss_mb"] = {p: sum(rss_mb(pid) for pid in tree) for p, tree in pids.items()}
        except Exception:
            for path, node in nodes.items():
                _log(f"{path} log tail:\n" + node.log())
            _log("Triton log tail:\n" + triton.log_tail())
            raise
    config["loadavg_1m_after"] = os.getloadavg()[0]
    return {"config": config, "summary": summarize(rounds), "rounds": rounds}


def format_report(result: Json) -> str:
    c, s = result["config"], result["summary"]
    rows = [("metric", *PATHS.values())]
    for key, label, _, _ in PATH_FIELDS:
        if key in s and s[key]:
            rows.append((label, *(cell(s[key][p]) if p in s[key] else "-" for p in PATHS)))
            if "vs_triton" in s[key]:
                rows.append(("  / Triton", *(f"{s[key]['vs_triton'][p]['median']:.2f}x" for p in PATHS)))
    placement = "pinned: servers on CPU 0, load generator on CPU 1" if c["pin"] else "shared: all on both cores"
    lines = [f"the local hit path: {c['model_mb']:.2f} MB MLP, {c['rounds']} interleaved rounds, c=1 {c['requests']} "
             f"requests, c={c['concurrency']} {c['seconds']:g} s, {placement}; medians (min-max over rounds), "
             f"ratios paired per round; 1-min load average {c['loadavg_1m_before']:.1f} before, "
             f"{c['loadavg_1m_after']:.1f} after", ""]
    lines += table(rows)
    lines += ["", *(f"goals, {PATHS[path]} / Triton: " + "; ".join(
        f"{g['figure']} {g['ratio']['median']:.2f}x {g['goal']} {'PASS' if g['pass'] else 'MISS'}"
        for g in s["goals"] if g["path"] == path) for path in NODES),
              "RSS after the rounds, MB: " + ", ".join(f"{p} {mb:.0f}" for p, mb in c["rss_mb"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = report.options("python -m bench.hot_path", __doc__.splitlines()[0],
                            "interleaved rounds; a multiple of 5 rotates the order fairly (default 6)")
    parser.add_argument("--pin", action="store_true",
                        help="servers on CPU 0, load generator on CPU 1 (measures the servers)")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(report.QUICK)
    return report.main(args, lambda: run(args, Signals()), format_report, _log)


if __name__ == "__main__":
    sys.exit(main())
