"""`make bench`: a real meshserve node against the floor, same machine, same model file, one run.

Starts a throw-away etcd, writes a 1 MB MLP, starts the node and the floor (bench.floor) on that
file and one load generator process (bench.loadgen, stock tritonclient.grpc.aio), then runs
interleaved rounds of c=1 latency and c=16 throughput, alternating which server goes first, because
throughput on these shared machines swings by +-25% between rounds. Then cold starts of fresh
copies of the model on the node, next to ONNX Runtime's bare session create time.

Prints medians, node/floor ratios and the issue's goals (p50 <= 1.10x, throughput >= 0.90x);
`--json` prints the same as JSON. Everything it starts is stopped on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import report
from bench.floor import create_session
from bench.procs import SLACK_S, FloorProcess, LoadGenProcess, Route, Signals, pin, rss_mb, run_rounds
from bench.report import SERVERS, format_report, summarize
from deploy.local.models import write_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess

MODEL = "mlp"
IN_FEATURES = 16  # INPUT0 FP32 [-1, 16] -> OUTPUT0 FP32 [-1, 4], about 1 MB of weights
CAPACITY = "1GiB"
SERVER_CPUS = {0}
LOADGEN_CPUS = {1}


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _cold_starts(loadgen: LoadGenProcess, node: NodeProcess, repo: Path, count: int) -> dict[str, Any]:
    """Fresh names each time, so every load is a real one: file parse, session create, registration."""
    loads = []
    files = []
    for i in range(count):
        name = f"cold{i}"
        files.append(write_mlp(repo, name, in_features=IN_FEATURES) / "1" / "model.onnx")
        loads.append(loadgen.run(SLACK_S * 2, op="cold", target=node.target, model=name, like=MODEL))
    create_session(files[0])  # the process's first session also pays for ORT's own setup
    creates, first_runs = [], []
    feeds = {"INPUT0": np.ones((1, IN_FEATURES), np.float32)}
    for file in files:
        for _ in range(3):
            started = time.perf_counter()
            session = create_session(file)
            created = time.perf_counter()
            session.run(None, feeds)
            creates.append(created - started)
            first_runs.append(time.perf_counter() - created)
    totals = [c["total_s"] for c in loads]
    return {
        "node_total_s": totals,
        "node_total_median_s": statistics.median(totals),
        "node_load_median_s": statistics.median(c["load_s"] for c in loads),
        "node_first_infer_median_s": statistics.median(c["first_infer_s"] for c in loads),
        "ort_create_s": creates,
        "ort_create_median_s": statistics.median(creates),
        "ort_first_run_median_s": statistics.median(first_runs),
    }


def run(args: argparse.Namespace, signals: Signals) -> dict[str, Any]:
    # Other work on the machine is the main source of noise: the load average says how much there was.
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshserve-bench-")))
        repo = work / "models"
        model_file = write_mlp(repo, MODEL, in_features=IN_FEATURES) / "1" / "model.onnx"
        etcd = signals.start(stack, EtcdProcess.start, EtcdProcess.stop)
        _log(f"etcd at {etcd.endpoint}; starting the node and the floor")
        node = signals.start(stack, lambda: NodeProcess.start(etcd=etcd.endpoint, model_repository=repo,
                                                              capacity=CAPACITY, metrics_port=0), NodeProcess.stop)
        floor = signals.start(stack, lambda: FloorProcess(model_file, MODEL), FloorProcess.stop)
        loadgen = signals.start(stack, LoadGenProcess, LoadGenProcess.stop)
        servers = {"floor": Route(floor.target, [floor.pid]), "node": Route(node.target, [node.process.pid])}
        if args.pin:
            for route in servers.values():
                pin(route.servers[0], SERVER_CPUS)
            pin(loadgen.pid, LOADGEN_CPUS)
            pin(os.getpid(), SERVER_CPUS)  # the bench itself only waits, and creates sessions at the end
        try:
            warm = {s: loadgen.run(SLACK_S * 2, op="warmup", target=t, model=MODEL, requests=args.warmup)
                    for s, (t, _, _) in servers.items()}
            floor_out, node_out = (np.asarray(warm[s]["outputs"]["OUTPUT0"]) for s in SERVERS)
            if not np.allclose(floor_out, node_out, rtol=1e-5, atol=1e-6):
                raise RuntimeError(f"node and floor disagree on the same input: {floor_out} vs {node_out}")
            rounds = run_rounds(loadgen, servers, MODEL, args, _log)
            rss = {s: rss_mb(route.servers[0]) for s, route in servers.items()}
            _log(f"cold starts: {args.cold} fresh models")
            cold = _cold_starts(loadgen, node, repo, args.cold)
        except Exception:
            _log("node log tail:\n" + node.log())
            raise
        model_mb = model_file.stat().st_size / 1e6
    config = {"rounds": args.rounds, "requests": args.requests, "seconds": args.seconds,
              "concurrency": args.concurrency, "warmup": args.warmup, "pin": args.pin, "model_mb": model_mb,
              "cpus": os.cpu_count(), "loadavg_1m_before": load_before,
              "loadavg_1m_after": os.getloadavg()[0]}
    return {"config": config, "summary": summarize(rounds), "rounds": rounds, "rss_mb": rss,
            "cold_start": cold}


def main(argv: list[str] | None = None) -> int:
    parser = report.options("python -m bench.node_vs_floor", __doc__.splitlines()[0],
                            "interleaved rounds per server; even, so each goes first as often (default 6)")
    parser.add_argument("--cold", type=int, default=5, help="cold starts with fresh model names")
    parser.add_argument("--pin", action="store_true",
                        help="servers on CPU 0, load generator on CPU 1 (measures the servers)")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(report.QUICK, cold=2)
    if args.pin and not {0, 1} <= os.sched_getaffinity(0):
        parser.error("--pin needs CPUs 0 and 1")
    return report.main(args, lambda: run(args, Signals()), format_report, _log)


if __name__ == "__main__":
    sys.exit(main())
