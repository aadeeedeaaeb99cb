"""The hit path and one mesh hop with TLS against plaintext, in the same run.

Two 2-node LocalMeshes at once on a 1 MB MLP, one copy each (on its "owner"): the plaintext mesh and the
TLS mesh (`meshserve local --tls`: TLS on the client ports, mutual TLS between peers, etcd over mutual TLS
with auth). Interleaved rounds, each path in turn: hit (direct to the owner) and hop (through the other
node, which forwards to the owner), each in plaintext and over TLS; the client is tritonclient.grpc.aio in
this process, on long-lived connections as real clients keep them. Printed: c=1 p50 and c=N throughput per
path and the TLS/plaintext ratios, and what the hop adds to the hit (hop - hit, c=1 p50) in each mode.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as aioclient

from bench.mesh_hop import IN_FEATURES, MODEL, copies
from bench.report import cell, options, spread, table
from deploy.local.models import write_mlp
from meshnode.local.mesh import LocalMesh

Json = dict[str, Any]
_log = functools.partial(print, "[tls]", file=sys.stderr, flush=True)  # progress; stdout is the result
PATHS = ("plain hit", "plain hop", "tls hit", "tls hop")


def _client(mesh: LocalMesh, target: str) -> aioclient.InferenceServerClient:
    if mesh.certs is None:
        return aioclient.InferenceServerClient(target)
    return aioclient.InferenceServerClient(target, ssl=True, root_certificates=str(mesh.certs.client_ca))


def _inputs() -> list[aioclient.InferInput]:
    tensor = aioclient.InferInput("INPUT0", [1, IN_FEATURES], "FP32")
    tensor.set_data_from_numpy(np.ones((1, IN_FEATURES), np.float32))
    return [tensor]


async def _latency(client: aioclient.InferenceServerClient, requests: int) -> float:
    inputs, took = _inputs(), []
    for _ in range(requests):
        started = time.perf_counter()
        await client.infer(MODEL, inputs)
        took.append((time.perf_counter() - started) * 1000)
    return statistics.median(took)


async def _throughput(clients: list[aioclient.InferenceServerClient], seconds: float) -> float:
    inputs, done = _inputs(), [0]
    deadline = time.monotonic() + seconds

    async def caller(client: aioclient.InferenceServerClient) -> None:
        while time.monotonic() < deadline:
            await client.infer(MODEL, inputs)
            done[0] += 1

    started = time.monotonic()
    await asyncio.gather(*(caller(c) for c in clients))
    return done[0] / (time.monotonic() - started)


async def measure(targets: dict[str, tuple[LocalMesh, str]], args: argparse.Namespace) -> list[Json]:
    # One connection per caller and path, opened and warmed before any round.
    clients = {p: [_client(mesh, t) for _ in range(args.concurrency)] for p, (mesh, t) in targets.items()}
    try:
        for path, group in clients.items():
            await asyncio.gather(*(_latency(c, max(1, args.warmup // len(group))) for c in group))
            _log(f"warmed {path}")
        rounds = []
        for i in range(args.rounds):
            order = PATHS[i % len(PATHS):] + PATHS[:i % len(PATHS)]  # each path leads in turn
            result: Json = {}
            for path in order:
                result[path] = {"p50_ms": await _latency(clients[path][0], args.requests),
                                "rps": await _throughput(clients[path], args.seconds)}
            _log(f"round {i + 1}: " + ", ".join(f"{p} {r['p50_ms']:.3f} ms {r['rps']:.0f}/s"
                                                for p, r in result.items()))
            rounds.append(result)
        return rounds
    finally:
        for group in clients.values():
            for c in group:
                await c.close()


def summarize(rounds: list[Json]) -> Json:
    summary: Json = {key: {p: spread([r[p][key] for r in rounds]) for p in PATHS} for key in ("p50_ms", "rps")}
    # Paired within a round: both modes then saw the same machine.
    for kind in ("hit", "hop"):
        summary[f"{kind}_tls_over_plain"] = {key: spread([r[f"tls {kind}"][key] / r[f"plain {kind}"][key]
                                                          for r in rounds]) for key in ("p50_ms", "rps")}
    for mode in ("plain", "tls"):
        summary[f"{mode}_hop_added_ms"] = spread([r[f"{mode} hop"]["p50_ms"] - r[f"{mode} hit"]["p50_ms"]
                                                   for r in rounds])
    return summary


def run(args: argparse.Namespace) -> Json:
    config: Json = {k: getattr(args, k) for k in ("rounds", "requests", "seconds", "concurrency", "warmup")}
    config["loadavg_1m_before"] = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshserve-tls-bench-")))
        write_mlp(work / "models", MODEL, in_features=IN_FEATURES)
        targets: dict[str, tuple[LocalMesh, str]] = {}
        for mode in ("plain", "tls"):
            (work / mode).mkdir()
            mesh = stack.enter_context(LocalMesh.start(
                nodes=2, model_repository=work / "models", capacity="1GiB", log_dir=work / mode, tls=mode == "tls",
                extra_args=["--max-copies", "1", "--no-proactive-loads"]))
            owner = _place(mesh)
            targets[f"{mode} hit"] = (mesh, mesh.nodes[owner].target)
            targets[f"{mode} hop"] = (mesh, mesh.nodes[1 - owner].target)
            _log(f"{mode}: {MODEL} on {mesh.nodes[owner].instance_id}")
        rounds = asyncio.run(measure(targets, args))
    config["loadavg_1m_after"] = os.getloadavg()[0]
    return {"config": config, "summary": summarize(rounds), "rounds": rounds}


def _place(mesh: LocalMesh) -> int:
    """One plain infer to node-0 (no metadata call, which would load a copy on whichever node gets it);
    the index of the node that loaded the one copy."""
    async def first() -> None:
        async with _client(mesh, mesh.nodes[0].target) as client:
            await client.infer(MODEL, _inputs())

    asyncio.run(first())
    deadline = time.monotonic() + 20
    while sorted(held := copies(mesh)) != [0.0, 1.0]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"expected one copy of {MODEL}, models per node: {held}")
        time.sleep(0.1)
    return held.index(1.0)


def format_report(result: Json) -> str:
    c, s = result["config"], result["summary"]
    lines = [f"TLS against plaintext: 2-node meshes, one copy of a 1 MB MLP; {c['rounds']} interleaved rounds, c=1 "
             f"{c['requests']} requests, c={c['concurrency']} {c['seconds']:g} s; medians (min-max over rounds); "
             f"1-min load average {c['loadavg_1m_before']:.1f} before, {c['loadavg_1m_after']:.1f} after", ""]
    rows = [("metric", *PATHS), ("c=1 p50 ms", *(cell(s["p50_ms"][p]) for p in PATHS)),
            (f"c={c['concurrency']} req/s", *(cell(s["rps"][p]) for p in PATHS))]
    lines += table(rows)
    lines.append("")
    for kind in ("hit", "hop"):
        ratio = s[f"{kind}_tls_over_plain"]
        lines.append(f"{kind}: TLS/plaintext c=1 p50 {cell(ratio['p50_ms'])}x, throughput {cell(ratio['rps'])}x")
    lines.append(f"the hop adds (c=1 p50): plaintext {cell(s['plain_hop_added_ms'])} ms, "
                 f"TLS {cell(s['tls_hop_added_ms'])} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = options("python -m bench.tls", __doc__.splitlines()[0], "interleaved rounds (default 6)")
    parser.set_defaults(concurrency=8)  # one process drives every path: more callers would measure the client
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.seconds, args.warmup = 1, 20, 0.3, 20
    result = run(args)
    print(json.dumps(result, indent=1) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
