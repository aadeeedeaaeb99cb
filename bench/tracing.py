"""What tracing costs on the hit path: tracing off, tracing on with every request sampled, and the code before
tracing existed, in the same run.

Four single-node meshes on one etcd and one 1 MB MLP, each holding the model loaded: "off" (this tree, no
OTLP endpoint), "on" (this tree, `--otlp-endpoint` to an OTLP receiver in this process,
OTEL_TRACES_SAMPLER=always_on: every request is a recorded, exported trace), "unsampled" (the same with
always_off: the span code runs, nothing is recorded or exported) and "before" (the last commit without
meshnode/observability/tracing.py, from `git archive`, so nothing in the checkout changes). Interleaved
rounds of c=1 latency and c=16 throughput through stock tritonclient (bench.loadgen), each path first in turn.
Printed: each path's medians (min-max over rounds), on/off and off/before ratios of c=1 p50 (the issue's goals:
on/off <= 1.10x, off/before: nothing measurable), and how many spans the receiver got from "on".
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from bench.mesh_hop import IN_FEATURES, MODEL
from bench.procs import SLACK_S, LoadGenProcess, Route, Signals, run_rounds
from bench.report import PATH_FIELDS, QUICK, cell, options, spread, summarize_paths, table
from bench.report import main as report_main
from deploy.local.models import write_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from tests.integration.otlp_receiver import otlp_receiver

Json = dict[str, Any]
ROOT = Path(__file__).resolve().parents[1]
PATHS = ("before", "off", "unsampled", "on")
GOALS = {("on", "off"): 1.10, ("off", "before"): 1.03, ("unsampled", "off"): 1.10}  # c=1 p50 ratio bounds
_log = functools.partial(print, "[tracing]", file=sys.stderr, flush=True)  # progress; stdout is the result


def _git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True).stdout


def before_tracing(into: Path) -> str:
    """Extract the newest commit without tracing (the parent of the one that added it, else HEAD) into `into`;
    returns its short hash."""
    added = _git("log", "-1", "--format=%H", "--diff-filter=A", "--", "meshnode/observability/tracing.py").strip()
    revision = f"{added.decode()}~1" if added else "HEAD"
    with tarfile.open(fileobj=io.BytesIO(_git("archive", revision)), mode="r:") as archive:
        archive.extractall(into, filter="data")
    return _git("rev-parse", "--short", revision).decode().strip()


def _node(etcd: EtcdProcess, repo: Path, name: str, extra: list[str], env: dict[str, str]) -> NodeProcess:
    return NodeProcess.start(etcd=etcd.endpoint, model_repository=repo, capacity="1GiB", etcd_prefix=f"bench-{name}",
                             instance_id=name, metrics_port=0, extra_args=["--no-proactive-loads", *extra],
                             env=env)


def run(args: argparse.Namespace, signals: Signals) -> Json:
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshserve-tracing-")))
        repo = work / "models"
        write_mlp(repo, MODEL, in_features=IN_FEATURES)
        revision = before_tracing(work / "before")
        receiver = stack.enter_context(otlp_receiver())
        etcd = signals.start(stack, EtcdProcess.start, EtcdProcess.stop)
        # The old tree first on the path; PYTHONSAFEPATH keeps `python -m` from putting this checkout before it.
        old = {"PYTHONPATH": str(work / "before"), "PYTHONSAFEPATH": "1"}
        on = ["--otlp-endpoint", receiver.endpoint]
        starts = {"before": ([], old), "off": ([], {}), "unsampled": (on, {"OTEL_TRACES_SAMPLER": "always_off"}),
                  "on": (on, {"OTEL_TRACES_SAMPLER": "always_on"})}
        nodes = {path: signals.start(stack, functools.partial(_node, etcd, repo, path, *starts[path]), NodeProcess.stop)
                 for path in PATHS}
        _log(f"nodes up; 'before' is commit {revision}")
        loadgen = signals.start(stack, LoadGenProcess, LoadGenProcess.stop)
        routes = {path: Route(node.target, [node.process.pid]) for path, node in nodes.items()}
        for route in routes.values():  # loads the model, then warms up
            loadgen.run(SLACK_S * 2, op="warmup", target=route.target, model=MODEL, requests=args.warmup)
        rounds = run_rounds(loadgen, routes, MODEL, args, _log)
        spans = len([s for s in receiver.spans() if s.node == "on"])
    summary = summarize_paths(rounds, PATHS)
    p50 = {path: [r[path]["latency"]["p50_ms"] for r in rounds] for path in PATHS}
    ratios = {f"{a}/{b}": spread([x / y for x, y in zip(p50[a], p50[b], strict=True)]) for a, b in GOALS}
    config = {"rounds": args.rounds, "requests": args.requests, "seconds": args.seconds,
              "concurrency": args.concurrency, "before": revision, "loadavg_1m_before": load_before,
              "loadavg_1m_after": os.getloadavg()[0]}
    return {"config": config, "summary": summary, "p50_ratios": ratios, "spans_received": spans, "rounds": rounds}


def format_report(result: Json) -> str:
    config, summary = result["config"], result["summary"]
    rows: list[tuple[str, ...]] = [("metric", *PATHS)]
    rows += [(label, *(cell(summary[key][p]) for p in PATHS)) for key, label, _, _ in PATH_FIELDS if key in summary
             and len(summary[key]) == len(PATHS)]
    lines = [f"tracing on the hit path: {config['rounds']} interleaved rounds, c=1 {config['requests']} requests, "
             f"c={config['concurrency']} {config['seconds']:g} s each; 'before' is commit {config['before']}",
             f"medians (min-max over rounds); 1-min load average {config['loadavg_1m_before']:.1f} before, "
             f"{config['loadavg_1m_after']:.1f} after", "", *table(rows), ""]
    for (a, b), bound in GOALS.items():
        ratio = result["p50_ratios"][f"{a}/{b}"]
        verdict = "PASS" if ratio["median"] <= bound else "MISS"
        lines.append(f"c=1 p50 {a}/{b}: {ratio['median']:.3f}x ({ratio['min']:.3f}-{ratio['max']:.3f}, paired per "
                     f"round), goal <= {bound:.2f}x: {verdict}")
    lines.append(f"spans received from 'on': {result['spans_received']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = options("python -m bench.tracing", __doc__.splitlines()[0],
                     "interleaved rounds; a multiple of 4, so each path goes first as often (default 6)")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return report_main(args, lambda: run(args, Signals()), format_report, _log)


if __name__ == "__main__":
    sys.exit(main())
