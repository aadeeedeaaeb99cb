"""Chaos soak: a mesh under fixed-rate, checked load while seeded random faults hit it.

`python -m bench.chaos [--seconds 600] [--seed 1] [--rate 40] [--triton] [--json] [--quick]` starts a
3-node mesh (beside a Triton each with --triton) on loopback, sends tritonclient requests through every
node at a fixed rate (bench.chaos_load, each answer checked against numpy), and injects one fault at a
time, in a seeded random order that takes every kind in turn:
- kill9: SIGKILL a node, start it again with the same id and ports;
- drain: SIGTERM a node (it drains), start it again;
- etcd: stop etcd for 5 s, start it again with its data;
- unreadable: one model's directory gone from the repository for 5 s;
- triton (with --triton): SIGKILL a node's Triton, start it again.
After each fault it waits until a request through every node succeeds (the recovery time). It prints, per
fault kind, the requests sent while the fault lasted, and how many failed and were answered wrong.
A failure is excused, and counted apart, only when the fault made it unservable: its node was down
(killed, draining or starting) during the request, or it asked for the unreadable model.
Everything it starts is stopped on exit; all traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton_sync
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from bench.chaos_load import CHANNEL_ARGS, CheckedLoad, Model, Outcome
from deploy.local.models import mlp_reference, write_mlp
from deploy.local.triton_models import write_python_onnx_mlp
from meshnode.local.mesh import LocalMesh

MODELS = 6
IN_FEATURES = 16
DOWN_S = 5.0  # how long etcd stays stopped and a model directory unreadable
RECOVERY_LIMIT_S = 60.0


@dataclass
class Fault:
    kind: str
    target: str  # the node, the model, or "etcd"
    started: float  # time.monotonic()
    undone: float = 0.0  # the component is back (restarted, readable again)
    recovered: float = 0.0  # a request through every node succeeded again


def _log(message: str) -> None:
    print(f"[chaos] {message}", file=sys.stderr, flush=True)


def _write_models(repo: Path, triton: bool) -> list[Model]:
    models = []
    write = write_python_onnx_mlp if triton else write_mlp
    for i in range(MODELS):
        name = f"chaos-{i}"
        directory = write(repo, name, in_features=IN_FEATURES, approx_bytes=200_000, seed=i)
        x = np.random.default_rng(100 + i).standard_normal((1, IN_FEATURES)).astype(np.float32)
        models.append(Model(name, x, mlp_reference(directory, x)))
    return models


def _refusal(target: str, model: Model, timeout_s: float = 5.0) -> str | None:
    """None when `target` answers `model` right; else what it answered."""
    client = triton_sync.InferenceServerClient(target, channel_args=CHANNEL_ARGS)
    try:
        x = InferInput("INPUT0", list(model.x.shape), "FP32")
        x.set_data_from_numpy(model.x)
        got = client.infer(model.name, [x], client_timeout=timeout_s).as_numpy("OUTPUT0")
        right = got is not None and bool(np.allclose(got, model.expected, rtol=1e-4, atol=1e-5))
        return None if right else "a wrong answer"
    except InferenceServerException as error:
        return str(error)
    finally:
        client.close()


def _wait_recovered(mesh: LocalMesh, model: Model, load: CheckedLoad | None = None, since: float = 0.0) -> float:
    """When a request through every node succeeds again, from a new client and (with `load`) from the load's
    own clients, whose channels to a restarted node reconnect on their own schedule."""
    deadline = time.monotonic() + RECOVERY_LIMIT_S
    while True:
        refused = {node.instance_id: why for node in mesh.nodes
                   if (why := _refusal(node.target, model)) is not None}
        waiting = [] if load is None else [mesh.nodes[i].instance_id for i in range(len(mesh.nodes))
                                           if not load.answered_since(i, since)]
        if not refused and not waiting:
            return time.monotonic()
        if time.monotonic() >= deadline:
            # What each node still answered, for whoever reads the failure: the mesh's logs are gone with it.
            raise RuntimeError(f"the mesh did not serve {model.name} through every node within {RECOVERY_LIMIT_S:g}s:"
                               f" refused by {refused or 'none'}; the load's clients not answered since on "
                               f"{waiting or 'none'}")
        time.sleep(0.1)


def _inject(kind: str, mesh: LocalMesh, repo: Path, models: list[Model], rng: random.Random) -> Fault:
    if kind == "etcd":
        fault = Fault(kind, "etcd", time.monotonic())
        mesh.etcd.restart_after(DOWN_S)
    elif kind == "unreadable":
        # Moved away rather than chmod 0, which root (as in CI) reads through.
        victim = rng.choice(models).name
        fault = Fault(kind, victim, time.monotonic())
        away = repo / f".{victim}.away"
        (repo / victim).rename(away)
        try:
            time.sleep(DOWN_S)
        finally:
            away.rename(repo / victim)
    else:
        i = rng.randrange(len(mesh.nodes))
        fault = Fault(kind, mesh.nodes[i].instance_id, time.monotonic())
        if kind == "kill9":
            mesh.nodes[i].kill()
            mesh.start_again(i)
        elif kind == "drain":
            mesh.restart(i)
        else:  # triton
            mesh.tritons[i].kill()
            mesh.tritons[i].start_again()
    fault.undone = time.monotonic()
    return fault


def _excused(outcome: Outcome, faults: list[Fault], node_ids: list[str]) -> bool:
    """The fault made this request unservable: its node was down, or its model unreadable, meanwhile."""
    for fault in faults:
        if outcome.sent_at > fault.recovered or outcome.done_at < fault.started:
            continue
        if fault.kind in ("kill9", "drain") and fault.target == node_ids[outcome.node]:
            return True
        if fault.kind == "unreadable" and fault.target == outcome.model:
            return True
    return False


def _kind_of(outcome: Outcome, faults: list[Fault]) -> str:
    for fault in faults:
        if fault.started <= outcome.sent_at <= fault.recovered:
            return fault.kind
    return "steady"


def summarize(outcomes: list[Outcome], faults: list[Fault], node_ids: list[str]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for outcome in outcomes:
        row = rows.setdefault(_kind_of(outcome, faults), {"sent": 0, "ok": 0, "failed": 0, "excused": 0,
                                                           "wrong": 0, "failures": {}})
        row["sent"] += 1
        if outcome.result == "failed" and _excused(outcome, faults, node_ids):
            row["excused"] += 1
        else:
            row[outcome.result] += 1
        if outcome.result == "failed":
            key = f"{outcome.status}: {outcome.message[:160]}"
            row["failures"][key] = row["failures"].get(key, 0) + 1
    for kind, row in rows.items():
        times = [f.recovered - f.undone for f in faults if f.kind == kind]
        row["faults"] = len(times)
        row["recovery_s"] = {"median": statistics.median(times), "max": max(times)} if times else None
    totals = {k: sum(r[k] for r in rows.values()) for k in ("sent", "ok", "failed", "excused", "wrong")}
    return {"by_kind": rows, "totals": totals}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    kinds = ["kill9", "drain", "etcd", "unreadable"] + (["triton"] if args.triton else [])
    with tempfile.TemporaryDirectory(prefix="meshserve-chaos-") as work:
        repo = Path(work) / "models"
        models = _write_models(repo, args.triton)
        _log(f"starting a {args.nodes}-node mesh{' beside Tritons' if args.triton else ''}")
        with LocalMesh.start(nodes=args.nodes, model_repository=repo, capacity="256MiB",
                             log_dir=Path(work) / "logs", triton=args.triton) as mesh:
            node_ids = [n.instance_id for n in mesh.nodes]
            for model in models:  # every model loaded somewhere before the faults start
                _wait_recovered(mesh, model)
            load = CheckedLoad(mesh.targets(), models, rate_per_s=args.rate, seed=args.seed)
            load.start()
            faults: list[Fault] = []
            started = time.monotonic()
            order: list[str] = []
            try:
                # Whole rounds (at least one): every kind in turn, in a seeded order, until the time is up.
                while order or not faults or time.monotonic() - started < args.seconds:
                    time.sleep(args.gap)
                    if not order:
                        order = rng.sample(kinds, len(kinds))
                    kind = order.pop()
                    _log(f"{time.monotonic() - started:5.1f}s: {kind}")
                    fault = _inject(kind, mesh, repo, models, rng)
                    faults.append(fault)
                    fault.recovered = _wait_recovered(mesh, rng.choice(models), load, fault.undone)
                    _log(f"  recovered {fault.recovered - fault.undone:.2f}s after it was undone")
                time.sleep(args.gap)
            finally:
                outcomes = load.stop()
            elapsed = time.monotonic() - started
    summary = summarize(outcomes, faults, node_ids)
    config = {"seconds": round(elapsed, 1), "seed": args.seed, "rate": args.rate, "nodes": args.nodes,
              "triton": args.triton, "cpus": os.cpu_count()}
    return {"config": config, "faults": [asdict(f) for f in faults], **summary}


def format_report(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [f"meshserve chaos soak: {c['nodes']} nodes{' beside Tritons' if c['triton'] else ''}, "
             f"{c['rate']:g} req/s for {c['seconds']:g}s, seed {c['seed']}",
             f"{'fault':<11}{'faults':>7}{'sent':>8}{'ok':>8}{'failed':>8}{'excused':>9}{'wrong':>7}"
             f"{'recovery s (median / max)':>28}"]
    for kind, row in sorted(result["by_kind"].items()):
        recovery = row["recovery_s"]
        when = f"{recovery['median']:.2f} / {recovery['max']:.2f}" if recovery else "-"
        lines.append(f"{kind:<11}{row['faults']:>7}{row['sent']:>8}{row['ok']:>8}{row['failed']:>8}"
                     f"{row['excused']:>9}{row['wrong']:>7}{when:>28}")
    t = result["totals"]
    lines.append(f"{'all':<11}{len(result['faults']):>7}{t['sent']:>8}{t['ok']:>8}{t['failed']:>8}"
                 f"{t['excused']:>9}{t['wrong']:>7}")
    lines.append("failed: at a node that was up, for a model that was servable (goal 0); excused: the fault made "
                 "it unservable (its node down, or its model unreadable); wrong: an answer numpy disagrees with")
    for kind, row in sorted(result["by_kind"].items()):
        for message, count in sorted(row["failures"].items(), key=lambda m: -m[1])[:5]:
            lines.append(f"  {kind}: {count} x {message}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, report: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long faults are injected (600)")
    parser.add_argument("--seed", type=int, default=1, help="seeds the faults' order and targets, and the load")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second, over all nodes (40)")
    parser.add_argument("--gap", type=float, default=3.0, help="seconds of steady load between faults (3)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--triton", action="store_true", help="every node beside a Triton of its own")
    parser.add_argument("--json", action="store_true", help="the whole result as JSON on stdout")
    parser.add_argument("--quick", action="store_true", help="one round of every fault kind, for the tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.gap, args.rate = 0.0, 1.5, 20.0
    result = run(args)
    report(json.dumps(result) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
