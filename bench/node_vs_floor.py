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
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from bench.floor import create_session
from bench.procs import FloorProcess, LoadGenProcess, cpu_seconds, pin, rss_mb
from bench.report import SERVERS, format_report, summarize
from meshnode.etcd_process import EtcdProcess
from meshnode.examples import write_mlp
from meshnode.node_process import NodeProcess

MODEL = "mlp"
IN_FEATURES = 16  # INPUT0 FP32 [-1, 16] -> OUTPUT0 FP32 [-1, 4], about 1 MB of weights
CAPACITY = "1GiB"
SERVER_CPUS = {0}
LOADGEN_CPUS = {1}
# Slack on top of a phase's own bound before the bench calls the load generator stuck.
SLACK_S = 60.0


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _measure(
    loadgen: LoadGenProcess, pid: int, target: str, phase: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One phase against one server, with the server's CPU per request read from /proc around it."""
    cpu0 = cpu_seconds(pid)
    if phase == "latency":
        answer = loadgen.run(args.requests * 0.1 + SLACK_S, op="latency", target=target, model=MODEL,
                             requests=args.requests)
    else:
        answer = loadgen.run(args.seconds + SLACK_S, op="throughput", target=target, model=MODEL,
                             concurrency=args.concurrency, seconds=args.seconds)
    answer["server_cpu_us_per_req"] = (cpu_seconds(pid) - cpu0) * 1e6 / answer["requests"]
    return answer


def _rounds(loadgen: LoadGenProcess, servers: dict[str, tuple[int, str]],
            args: argparse.Namespace) -> list[dict[str, Any]]:
    rounds = []
    for i in range(args.rounds):
        order = SERVERS if i % 2 == 0 else SERVERS[::-1]
        result: dict[str, Any] = {"order": list(order)}
        for server in order:
            pid, target = servers[server]
            result[server] = {phase: _measure(loadgen, pid, target, phase, args)
                              for phase in ("latency", "throughput")}
            lat, thr = result[server]["latency"], result[server]["throughput"]
            _log(f"round {i + 1}/{args.rounds} {server}: c=1 p50 {lat['p50_ms']:.3f} ms "
                 f"p99 {lat['p99_ms']:.3f} ms; c=16 {thr['rps']:.0f} req/s, "
                 f"server {thr['server_cpu_us_per_req']:.0f} us/req")
        rounds.append(result)
    return rounds


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    # Other work on the machine is the main source of noise: the load average says how much there was.
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshserve-bench-")))
        repo = work / "models"
        model_file = write_mlp(repo, MODEL, in_features=IN_FEATURES) / "1" / "model.onnx"
        etcd = EtcdProcess.start()
        stack.callback(etcd.stop)
        _log(f"etcd at {etcd.endpoint}; starting the node and the floor")
        node = NodeProcess.start(etcd=etcd.endpoint, model_repository=repo, capacity=CAPACITY,
                                 metrics_port=None)
        stack.callback(node.stop)
        floor = FloorProcess(model_file, MODEL)
        stack.callback(floor.stop)
        loadgen = LoadGenProcess()
        stack.callback(loadgen.stop)
        servers = {"floor": (floor.pid, floor.target), "node": (node.process.pid, node.target)}
        if args.pin:
            for pid, _ in servers.values():
                pin(pid, SERVER_CPUS)
            pin(loadgen.pid, LOADGEN_CPUS)
            pin(os.getpid(), SERVER_CPUS)  # the bench itself only waits, and creates sessions at the end
        try:
            warm = {s: loadgen.run(SLACK_S * 2, op="warmup", target=t, model=MODEL, requests=args.warmup)
                    for s, (_, t) in servers.items()}
            floor_out, node_out = (np.asarray(warm[s]["outputs"]["OUTPUT0"]) for s in SERVERS)
            if not np.allclose(floor_out, node_out, rtol=1e-5, atol=1e-6):
                raise RuntimeError(f"node and floor disagree on the same input: {floor_out} vs {node_out}")
            rounds = _rounds(loadgen, servers, args)
            rss = {s: rss_mb(pid) for s, (pid, _) in servers.items()}
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.node_vs_floor",
                                     description=__doc__.splitlines()[0])
    # Many short rounds beat few long ones here: the noise comes in bursts from other work on the machine.
    parser.add_argument("--rounds", type=int, default=6,
                        help="interleaved rounds per server; even, so each goes first as often (default 6)")
    parser.add_argument("--seconds", type=float, default=3.0, help="c=16 duration per round (default 3)")
    parser.add_argument("--requests", type=int, default=1000, help="c=1 requests per round (default 1000)")
    parser.add_argument("--concurrency", type=int, default=16, help="callers in the throughput phase")
    parser.add_argument("--warmup", type=int, default=300, help="requests per server before measuring")
    parser.add_argument("--cold", type=int, default=5, help="cold starts with fresh model names")
    parser.add_argument("--pin", action="store_true",
                        help="servers on CPU 0, load generator on CPU 1 (measures the servers)")
    parser.add_argument("--quick", action="store_true", help="tiny counts for a smoke test (noise)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser


def _sigterm(signum: int, frame: object) -> NoReturn:
    # Unwinds like Ctrl-C, so every child started so far is stopped.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.requests, args.warmup, args.cold = 1, 1.0, 100, 20, 2
    if args.pin and not {0, 1} <= os.sched_getaffinity(0):
        _parser().error("--pin needs CPUs 0 and 1")
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        result = run(args)
    except KeyboardInterrupt:
        _log("interrupted; everything it started is stopped")
        return 130
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
