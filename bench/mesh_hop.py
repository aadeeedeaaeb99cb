"""One forwarded mesh hop against one bare gRPC hop in the same run, and etcd writes under full load.

A 2-node LocalMesh on a 1 MB MLP: one request to node-0, and the node placement loads it on is the owner,
the other the forwarder; bench.proxy goes in front of the owner. Interleaved rounds (bench.loadgen in its own
process) through A: direct to the owner, B: the forwarder (one mesh hop), C: the proxy (one bare hop) give
(B - A) / (C - A) at c=1 p50, goal <= 1.10x. Then c=16 through both nodes at once with each node's
meshserve_etcd_writes_total read around it. All it starts is stopped on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton

from bench import report
from bench.procs import SLACK_S, LoadGenProcess, Route, Signals, run_rounds
from bench.proxy import ProxyProcess
from bench.report import PATH_FIELDS, cell, spread, summarize_paths, table
from deploy.local.models import write_mlp
from meshnode.local.mesh import LocalMesh

MODEL = "mlp"
IN_FEATURES = 16  # INPUT0 FP32 [-1, 16] -> OUTPUT0 FP32 [-1, 4], about 1 MB of weights
PATHS = {"A": "direct to owner", "B": "via forwarder (mesh hop)", "C": "via bare proxy (bare hop)"}
Json = dict[str, Any]
_log = functools.partial(print, "[mesh_hop]", file=sys.stderr, flush=True)  # progress; stdout is the result


def scrape(port: int | None) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-zA-Z_:][\w:]*) (\S+)$", text, re.MULTILINE)}


def copies(mesh: LocalMesh) -> list[float]:
    return [scrape(n.metrics_port)["modelmesh_instance_models_total"] for n in mesh.nodes]


def single_copy(mesh: LocalMesh, timeout_s: float = 20.0) -> int:
    """Index of the one node holding the model, once its metrics and every node's view of the record agree
    (a node whose view lists no copy yet would place a new load, maybe on itself, at its next miss)."""
    deadline, held, reasons = time.monotonic() + timeout_s, [0.0], set()
    clients = [triton.InferenceServerClient(n.target) for n in mesh.nodes]
    try:
        while time.monotonic() < deadline:
            held = copies(mesh)
            reasons = {m.reason for c in clients for m in c.get_model_repository_index().models if m.name == MODEL}
            holder = held.index(1.0) if sorted(held) == [0.0, 1.0] else -1
            if holder >= 0 and reasons == {f"copies: {mesh.nodes[holder].instance_id} (loaded)"}:
                return holder
            time.sleep(0.1)
    finally:
        for client in clients:
            client.close()
    raise RuntimeError(f"expected one copy of {MODEL}: models per node {held}, the nodes' indexes say {reasons}")


def place(mesh: LocalMesh) -> int:
    """One plain infer to node-0 (no metadata call: that would load a copy on whichever node gets it)."""
    tensor = triton.InferInput("INPUT0", [1, IN_FEATURES], "FP32")
    with triton.InferenceServerClient(mesh.nodes[0].target) as client:
        client.infer(MODEL, [tensor.set_data_from_numpy(np.ones((1, IN_FEATURES), np.float32))])
    return single_copy(mesh)


def repin(mesh: LocalMesh, owner: int) -> None:
    """Leave the only copy on the owner again: the load generator's warm-up asks for model metadata, and a
    node without a copy loads one to answer it. Unload drops every copy; a load through the owner loads it there."""
    with triton.InferenceServerClient(mesh.nodes[owner].target) as client:
        client.unload_model(MODEL)
        deadline = time.monotonic() + 20
        while any(copies(mesh)) and time.monotonic() < deadline:
            time.sleep(0.1)
        client.load_model(MODEL)
    if (holder := single_copy(mesh)) != owner:
        raise RuntimeError(f"the model went to {mesh.nodes[holder].instance_id} instead of the owner")


def summarize(rounds: list[Json]) -> Json:
    summary = summarize_paths(rounds, PATHS)
    p50 = [{p: r[p]["latency"]["p50_ms"] for p in PATHS} for r in rounds]
    summary["added_p50_ms"] = {p: spread([r[p] - r["A"] for r in p50]) for p in ("B", "C")}
    # Paired within a round, as both hops then saw the same machine. A round where the bare hop
    # measured free (C <= A: noise) has no ratio; inf if every round did.
    ratio = spread([(r["B"] - r["A"]) / (r["C"] - r["A"]) for r in p50 if r["C"] > r["A"]] or [float("inf")])
    summary["hop_ratio"] = {**ratio, "goal": "<= 1.10x", "pass": ratio["median"] <= 1.10}
    summary["b_over_c"] = {k: summary[k]["B"]["median"] / summary[k]["C"]["median"] for k in ("p50_ms", "rps")}
    return summary


def full_load(mesh: LocalMesh, drivers: list[tuple[LoadGenProcess, str]], seconds: float, concurrency: int) -> Json:
    """Drive every node at once and count each node's etcd writes and API requests meanwhile."""
    before, started = [scrape(n.metrics_port) for n in mesh.nodes], time.monotonic()
    pool = ThreadPoolExecutor(len(drivers))
    try:
        answers = [f.result() for f in [pool.submit(loadgen.run, seconds + SLACK_S, op="throughput", target=target,
                                                    model=MODEL, concurrency=concurrency // len(drivers),
                                                    seconds=seconds) for loadgen, target in drivers]]
    finally:
        # No waiting: after Ctrl-C or an error the threads end once the load generators are stopped.
        pool.shutdown(wait=False, cancel_futures=True)
    elapsed, after = time.monotonic() - started, [scrape(n.metrics_port) for n in mesh.nodes]
    rates = {"etcd_writes_per_s": "meshserve_etcd_writes_total", "api_requests_per_s": "modelmesh_api_request_total"}
    nodes = {n.instance_id: {k: (a[m] - b[m]) / elapsed for k, m in rates.items()}
             for n, b, a in zip(mesh.nodes, before, after, strict=True)}
    return {"seconds": elapsed, "concurrency": concurrency, "client_rps": sum(a["rps"] for a in answers),
            "nodes": nodes}


def run(args: argparse.Namespace, signals: Signals) -> Json:
    config: Json = {k: getattr(args, k) for k in ("rounds", "requests", "seconds", "concurrency", "warmup",
                                                  "grpc_server")}
    config["loadavg_1m_before"] = os.getloadavg()[0]  # other work on the machine is the main noise
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshserve-mesh-hop-")))
        model_file = write_mlp(work / "models", MODEL, in_features=IN_FEATURES) / "1" / "model.onnx"
        config["model_mb"] = model_file.stat().st_size / 1e6
        (work / "logs").mkdir()  # LocalMesh.start expects it to exist
        # The bench's own load would make the mesh add a copy on the forwarder (B a local hit): one copy only.
        mesh = signals.start(stack, lambda: LocalMesh.start(
            nodes=2, model_repository=work / "models", capacity="1GiB", log_dir=work / "logs",
            extra_args=["--max-copies", "1", "--no-proactive-loads", "--grpc-server", args.grpc_server]),
            LocalMesh.stop)
        try:
            owner = place(mesh)
            own, fwd = mesh.nodes[owner], mesh.nodes[forwarder := 1 - owner]
            config |= {"owner": own.instance_id, "forwarder": fwd.instance_id}
            _log(f"placement put {MODEL} on {own.instance_id} (owner); {fwd.instance_id} forwards")
            proxy = signals.start(stack, lambda: ProxyProcess(own.target), ProxyProcess.stop)
            loadgen = signals.start(stack, LoadGenProcess, LoadGenProcess.stop)
            second = signals.start(stack, LoadGenProcess, LoadGenProcess.stop)  # full load drives two nodes
            opid = own.process.pid
            paths = {"A": Route(own.target, [opid]), "B": Route(fwd.target, [opid], fwd.process.pid),
                     "C": Route(proxy.target, [opid], proxy.pid)}
            warm = {p: loadgen.run(SLACK_S * 2, op="warmup", target=r.target, model=MODEL, requests=args.warmup)
                    for p, r in paths.items()}
            second.run(SLACK_S * 2, op="warmup", target=own.target, model=MODEL, requests=args.warmup)
            outputs = [np.asarray(warm[p]["outputs"]["OUTPUT0"]) for p in PATHS]
            if not all(np.allclose(outputs[0], o, rtol=1e-5, atol=1e-6) for o in outputs[1:]):
                raise RuntimeError(f"the three paths disagree on the same input: {outputs}")
            repin(mesh, owner)
            # The forwarder's first forwards open its channel to the owner: not part of any round.
            loadgen.run(SLACK_S * 2, op="latency", target=fwd.target, model=MODEL, requests=args.warmup)

            def check(path: str) -> None:
                if path == "B" and copies(mesh)[forwarder]:
                    raise RuntimeError("the forwarder loaded a copy: B would no longer be a hop")

            rounds = run_rounds(loadgen, paths, MODEL, args, _log, check)
            _log(f"full load: c={args.full_concurrency} through both nodes for {args.full_seconds:g} s")
            loaded = full_load(mesh, [(loadgen, fwd.target), (second, own.target)], args.full_seconds,
                               args.full_concurrency)
            if copies(mesh)[forwarder]:
                raise RuntimeError("the forwarder loaded a copy during the full-load phase")
        except Exception:
            for log in sorted((work / "logs").glob("*.log")):
                _log(f"{log.name} tail:\n" + "\n".join(log.read_text().splitlines()[-30:]))
            raise
    config["loadavg_1m_after"] = os.getloadavg()[0]
    return {"config": config, "summary": summarize(rounds), "rounds": rounds, "etcd": {"full_load": loaded}}


def format_report(result: Json) -> str:
    c, s = result["config"], result["summary"]
    rows = [("metric", *(f"{p}: {label}" for p, label in PATHS.items()))]
    rows += [(label, *(cell(s[key][p]) if p in s[key] else "-" for p in PATHS)) for key, label, _, _ in PATH_FIELDS]
    rows.append(("c=1 p50 added over A, ms", "-", cell(s["added_p50_ms"]["B"]), cell(s["added_p50_ms"]["C"])))
    ratio, bc = s["hop_ratio"], s["b_over_c"]
    lines = [f"one mesh hop vs one bare gRPC hop: {c['model_mb']:.2f} MB MLP on {c['owner']} (owner), {c['forwarder']} "
             f"forwards, on {c['grpc_server']} gRPC servers; {c['rounds']} interleaved rounds, c=1 {c['requests']} "
             f"requests, c={c['concurrency']} "
             f"{c['seconds']:g} s; medians (min-max over rounds); 1-min load average {c['loadavg_1m_before']:.1f} "
             f"before, {c['loadavg_1m_after']:.1f} after", ""]
    lines += table(rows)
    lines += ["", f"hop ratio (B - A) / (C - A), c=1 p50, paired per round: {cell(ratio)}x  goal {ratio['goal']}  "
              f"{'PASS' if ratio['pass'] else 'MISS'}",
              f"B/C: c=1 p50 {bc['p50_ms']:.2f}x, c=16 throughput {bc['rps']:.2f}x", ""]
    full = result["etcd"]["full_load"]
    lines.append(f"etcd writes under full load (c={full['concurrency']} over both nodes, {full['seconds']:.1f} s, "
                 f"{full['client_rps']:.0f} client req/s), goal ~1 per node per second or less:")
    lines += [f"  {n}: {v['etcd_writes_per_s']:.2f} writes/s at {v['api_requests_per_s']:.0f} API req/s (forwarded "
              "ones count on both nodes)" for n, v in full["nodes"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = report.options("python -m bench.mesh_hop", __doc__.splitlines()[0],
                            "interleaved rounds; a multiple of 3 rotates the order fairly")
    parser.add_argument("--full-seconds", type=float, default=10.0, help="full-load phase duration (default 10)")
    parser.add_argument("--full-concurrency", type=int, default=16, help="callers in total, split over both nodes")
    parser.add_argument("--grpc-server", choices=("aio", "threaded"), default="threaded",
                        help="the nodes' gRPC server (default threaded, the node's)")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(report.QUICK, full_seconds=2.0)
    return report.main(args, lambda: run(args, Signals()), format_report, _log)


if __name__ == "__main__":
    sys.exit(main())
