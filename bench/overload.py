"""Overload soak: one node offered several times what it can serve, at a fixed rate, with a client deadline.

`python -m bench.overload [--seconds 20] [--factor 5] [--deadline 1.0] [--json]` starts a throw-away etcd and one
node (its default bounds: --max-queued-per-model 32, --max-inflight 512, 2 runs at once per copy) on loopback,
writes a slow model (~10 ms a run on one core), and then:
1. capacity: a closed loop (bench.loadgen in its own process, --concurrency callers for --capacity-seconds)
   measures how many requests a second the node serves on that model;
2. overload: an open loop (bench.chaos_load: tritonclient.grpc.aio at a fixed rate, each answer checked against
   ONNX Runtime in this process) offers --factor times that for --seconds, each request with --deadline;
   the node's RSS is sampled throughout;
3. recovery: from the moment the load stops, requests are sent one after another until one is answered.

It prints what became of the offered requests (answered, refused with RESOURCE_EXHAUSTED, past their deadline,
anything else), the answered ones' latency against the deadline, the node's RSS before, at its peak and after,
and the recovery time, with the issue's goals: memory bounded (peak within MEMORY_GOAL of before), every
accepted request answered within its deadline, a normal answer within RECOVERY_GOAL_S of the load stopping.
A missed goal is printed as MISS; the exit status is non-zero only when the run itself broke.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton_sync
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from bench import report
from bench.chaos_load import CheckedLoad, Model, Outcome
from bench.floor import create_session
from bench.procs import SLACK_S, LoadGenProcess, Signals, cpu_seconds, rss_mb
from deploy.local.models import write_matmul_chain
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess

MODEL = "slow"
WIDTH, DEPTH = 256, 32  # the Gram matrix of the input through 32 MatMuls: ~10 ms a run on one core here
INPUTS = 4  # distinct inputs, each checked against its own reference
CAPACITY = "1GiB"
MEMORY_GOAL = 1.5  # peak RSS / RSS before the overload
RECOVERY_GOAL_S = 1.0
RSS_EVERY_S = 0.05
RECOVERY_LIMIT_S = 30.0
OK, REFUSED, LATE = "OK", "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.DEADLINE_EXCEEDED"


def _log(message: str) -> None:
    print(f"[overload] {message}", file=sys.stderr, flush=True)


class PeakRss:
    """A process's RSS sampled in a thread of its own until stopped: the highest seen."""

    def __init__(self, pid: int) -> None:
        self._pid, self.peak_mb = pid, rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(RSS_EVERY_S):
            with contextlib.suppress(OSError):  # the node went away: the run fails elsewhere
                self.peak_mb = max(self.peak_mb, rss_mb(self._pid))


def _models(model_file: Path) -> list[Model]:
    session = create_session(model_file)
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1, WIDTH)).astype(np.float32) for _ in range(INPUTS)]
    return [Model(MODEL, x, session.run(None, {"INPUT0": x})[0]) for x in xs]


def _recovery(target: str, model: Model, stopped_at: float) -> tuple[float, int]:
    """Requests back to back from `stopped_at` until one is answered right: the seconds that took, and how many
    were refused before it."""
    refused = 0
    with triton_sync.InferenceServerClient(target) as client:
        x = InferInput("INPUT0", list(model.x.shape), "FP32")
        x.set_data_from_numpy(model.x)
        while time.monotonic() - stopped_at < RECOVERY_LIMIT_S:
            try:
                got = client.infer(model.name, [x], client_timeout=RECOVERY_LIMIT_S).as_numpy("OUTPUT0")
            except InferenceServerException as error:
                if error.status() != REFUSED:
                    raise
                refused += 1
                continue
            if got is None or not np.allclose(got, model.expected, rtol=1e-4, atol=1e-5):
                raise RuntimeError("the node answered a normal request wrong after the overload")
            return time.monotonic() - stopped_at, refused
    raise RuntimeError(f"no normal answer within {RECOVERY_LIMIT_S:g} s of the load stopping")


def _overload(node: NodeProcess, models: list[Model], rate: float, args: argparse.Namespace) -> dict[str, Any]:
    pid = node.process.pid
    before = rss_mb(pid)
    cpu0 = {"node": cpu_seconds(pid), "client": cpu_seconds(os.getpid())}
    load = CheckedLoad([node.target], models, rate_per_s=rate, seed=1, timeout_s=args.deadline,
                       max_outstanding=int(rate * args.deadline) + 64)
    outcomes: list[Outcome] = []
    started = time.monotonic()
    with PeakRss(pid) as rss:
        load.start()
        time.sleep(args.seconds)  # the soak's length: the load runs in its own thread meanwhile
        stopped_at = time.monotonic()
        # The load stops sending now and waits for its last answers; the recovery probe starts at once.
        stopping = threading.Thread(target=lambda: outcomes.extend(load.stop()), name="stop-load")
        stopping.start()
        recovery_s, recovery_refused = _recovery(node.target, models[0], stopped_at)
        stopping.join()
    # Both share the machine's cores: a client short of CPU delays its own sends and measurements too.
    cpu = {who: (cpu_seconds(p) - cpu0[who]) / (time.monotonic() - started) for who, p in
           (("node", pid), ("client", os.getpid()))}
    return {"outcomes": outcomes, "cpu_cores": cpu,
            "rss_mb": {"before": before, "peak": rss.peak_mb, "after": rss_mb(pid)},
            "recovery_s": recovery_s, "recovery_refused": recovery_refused}


def _percentiles_ms(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50": None, "p99": None, "max": None}
    ms = np.asarray(seconds) * 1000.0
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max())}


def summarize(outcomes: list[Outcome], deadline_s: float) -> dict[str, Any]:
    """Counts by what became of each request (OK, wrong, or its status), and the latencies of answers and
    refusals."""
    kinds = Counter(OK if o.result == "ok" else "WRONG" if o.result == "wrong" else o.status for o in outcomes)
    answered = [o.done_at - o.sent_at for o in outcomes if o.result == "ok"]
    refused = [o.done_at - o.sent_at for o in outcomes if o.status == REFUSED]
    other = {kind: n for kind, n in kinds.items() if kind not in (OK, REFUSED, LATE)}
    first_other = next((f"{o.status}: {o.message}" for o in outcomes if o.result != "ok"
                        and o.status not in (REFUSED, LATE)), None)
    return {"offered": len(outcomes), "answered": kinds[OK], "refused": kinds[REFUSED], "late": kinds[LATE],
            "other": other, "first_other": first_other,
            "answered_ms": _percentiles_ms(answered), "refused_ms": _percentiles_ms(refused),
            "answered_after_deadline": sum(1 for s in answered if s > deadline_s)}


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    counts, rss = result["counts"], result["rss_mb"]
    ratio = rss["peak"] / rss["before"]
    missed = counts["late"] + counts["answered_after_deadline"]
    return [
        {"goal": f"memory bounded: peak RSS <= {MEMORY_GOAL:g}x before", "measured": f"{ratio:.2f}x",
         "pass": ratio <= MEMORY_GOAL},
        {"goal": "every accepted request answered within its deadline", "measured": f"{missed} missed",
         "pass": missed == 0},
        {"goal": f"a normal answer within {RECOVERY_GOAL_S:g} s of the load stopping",
         "measured": f"{result['recovery_s']:.3f} s", "pass": result["recovery_s"] < RECOVERY_GOAL_S},
        {"goal": "no request lost or answered wrong, or with another status", "measured":
         f"{sum(counts['other'].values())} other", "pass": not counts["other"]},
    ]


def run(args: argparse.Namespace, signals: Signals) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        repo = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshserve-overload-"))) / "models"
        model_file = write_matmul_chain(repo, MODEL, width=WIDTH, depth=DEPTH) / "1" / "model.onnx"
        models = _models(model_file)
        etcd = signals.start(stack, EtcdProcess.start, EtcdProcess.stop)
        node = signals.start(stack, lambda: NodeProcess.start(etcd=etcd.endpoint, model_repository=repo,
                                                              capacity=CAPACITY, metrics_port=None), NodeProcess.stop)
        loadgen = signals.start(stack, LoadGenProcess, LoadGenProcess.stop)
        try:
            loadgen.run(SLACK_S, op="warmup", target=node.target, model=MODEL, requests=20)
            _log(f"capacity: closed loop, {args.concurrency} callers for {args.capacity_seconds:g} s")
            closed = loadgen.run(args.capacity_seconds + SLACK_S, op="throughput", target=node.target, model=MODEL,
                                 concurrency=args.concurrency, seconds=args.capacity_seconds)
            rate = args.factor * closed["rps"]
            _log(f"capacity {closed['rps']:.0f} req/s; offering {rate:.0f} req/s for {args.seconds:g} s")
            soak = _overload(node, models, rate, args)
        except Exception:
            _log("node log tail:\n" + node.log())
            raise
    counts = summarize(soak["outcomes"], args.deadline)
    result = {
        "config": {"seconds": args.seconds, "factor": args.factor, "deadline_s": args.deadline,
                   "concurrency": args.concurrency, "capacity_seconds": args.capacity_seconds,
                   "model": f"{MODEL}: MatMul chain, width {WIDTH}, depth {DEPTH}"},
        "capacity": {"rps": closed["rps"], "p50_ms": closed["p50_ms"], "p99_ms": closed["p99_ms"]},
        "offered_rps": rate, "counts": counts, "rss_mb": soak["rss_mb"],
        # What the node still served under overload, against what it serves at its best.
        "answered_rps": counts["answered"] / args.seconds,
        "recovery_s": soak["recovery_s"], "recovery_refused": soak["recovery_refused"],
        "cpu_cores": soak["cpu_cores"], "cpus": os.cpu_count(),
    }
    result["goals"] = goals(result)
    return result


def format_report(result: dict[str, Any]) -> str:
    config, counts, rss = result["config"], result["counts"], result["rss_mb"]
    offered = counts["offered"]

    def share(n: int) -> str:
        return f"{100.0 * n / offered:.1f}%" if offered else "-"

    def ms(values: dict[str, float | None]) -> str:
        return "-" if values["p50"] is None else \
            f"p50 {values['p50']:.1f} ms, p99 {values['p99']:.1f} ms, max {values['max']:.1f} ms"

    rows = [("requests", "count", "share"), ("offered", str(offered), ""),
            ("answered (OK, checked)", str(counts["answered"]), share(counts["answered"])),
            ("refused (RESOURCE_EXHAUSTED)", str(counts["refused"]), share(counts["refused"])),
            ("past the deadline (DEADLINE_EXCEEDED)", str(counts["late"]), share(counts["late"]))]
    rows += [(f"other: {kind}", str(n), share(n)) for kind, n in sorted(counts["other"].items())]
    lines = [
        f"overload soak: {config['model']}; capacity {result['capacity']['rps']:.0f} req/s (closed loop, "
        f"c={config['concurrency']}, {config['capacity_seconds']:g} s); offered {config['factor']:g}x = "
        f"{result['offered_rps']:.0f} req/s for {config['seconds']:g} s, deadline {config['deadline_s']:g} s",
        "", *report.table(rows), "",
        f"answered: {result['answered_rps']:.0f} req/s, {result['answered_rps'] / result['capacity']['rps']:.2f}x "
        f"the capacity; latency {ms(counts['answered_ms'])} (deadline {config['deadline_s'] * 1000:.0f} ms)",
        f"refused latency: {ms(counts['refused_ms'])}",
        f"node RSS: before {rss['before']:.0f} MB, peak {rss['peak']:.0f} MB "
        f"({rss['peak'] / rss['before']:.2f}x), after {rss['after']:.0f} MB",
        f"recovery: a normal request answered {result['recovery_s'] * 1000:.0f} ms after the load stopped "
        f"({result['recovery_refused']} refused before it)",
        f"CPU during the soak, in cores of {result['cpus']}: node {result['cpu_cores']['node']:.2f}, "
        f"client (this process) {result['cpu_cores']['client']:.2f}",
    ]
    if counts["first_other"]:
        lines.append(f"first other outcome: {counts['first_other']}")
    rows = [("goal", "measured", "")] + [(g["goal"], g["measured"], "PASS" if g["pass"] else "MISS")
                                          for g in result["goals"]]
    return "\n".join([*lines, "", *report.table(rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--seconds", type=float, default=20.0, help="how long the overload is offered (default 20)")
    add("--factor", type=float, default=5.0, help="offered load as a multiple of the capacity (default 5)")
    add("--deadline", type=float, default=1.0, help="each request's client deadline, seconds (default 1)")
    add("--capacity-seconds", type=float, default=3.0, help="the closed loop's duration (default 3)")
    add("--concurrency", type=int, default=8, help="callers in the closed loop (default 8)")
    add("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    return report.main(args, lambda: run(args, Signals()), format_report, _log)


if __name__ == "__main__":
    sys.exit(main())
