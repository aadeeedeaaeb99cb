"""A decoupled model streaming 100 responses per request: Triton directly, through the node beside it, and
through one mesh hop.

Starts an etcd, two Tritons (meshnode.local.triton, installed by `make triton`) on a repository holding a
decoupled model as Triton's repeat_int32 (Python backend), node n0 beside the first (the copy) and node n1
beside the second with no room for a copy (so it forwards the stream to n0). A tritonclient.grpc.aio stream per
path sends requests one at a time, each answered by `--responses` responses as fast as the model sends them, in
interleaved rounds (each path first in turn). Prints, per path, the medians over rounds of the time to the first
response and to the last, and the ratios against Triton directly (the floor, measured in the same run).
Everything it starts is stopped on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcaio

from bench import report
from bench.procs import Signals
from bench.report import cell, spread, table
from deploy.local.triton_models import write_python_repeat
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from meshnode.local.triton import TritonProcess

MODEL = "repeat_int32"
PATHS = {"direct": "client -> Triton", "node": "client -> node -> Triton",
         "hop": "client -> node -> node -> Triton"}
FIGURES = {"first_ms": "time to first response, ms", "total_ms": "time to the last response, ms"}
Json = dict[str, Any]
_log = functools.partial(print, "[streaming]", file=sys.stderr, flush=True)  # stdout is the result


def repeat_inputs(count: int) -> list[grpcaio.InferInput]:
    tensors = []
    for name, data in (("IN", np.arange(count, dtype=np.int32)), ("DELAY", np.zeros(count, np.uint32)),
                       ("WAIT", np.zeros(1, np.uint32))):
        tensor = grpcaio.InferInput(name, list(data.shape), "INT32" if name == "IN" else "UINT32")
        tensor.set_data_from_numpy(data)
        tensors.append(tensor)
    return tensors


async def one_path(target: str, requests: int, responses: int) -> Json:
    """`requests` requests on one stream, one after another: the medians of the times to a request's first
    response and to its last (tritonclient's aio stream cannot ask for Triton's empty final response: the count
    of responses tells the last)."""
    sent = asyncio.Queue[float]()
    inputs = repeat_inputs(responses)

    async def requests_iter() -> AsyncIterator[dict[str, Any]]:
        for i in range(requests):
            await sent.join()  # the previous request answered in full
            sent.put_nowait(time.perf_counter())
            yield {"model_name": MODEL, "inputs": inputs, "request_id": str(i)}

    firsts, totals = [], []
    async with grpcaio.InferenceServerClient(target) as client:
        started = first = None
        got = 0
        async for _, error in client.stream_infer(requests_iter()):
            if error is not None:
                raise RuntimeError(f"{target}: {error}")
            now = time.perf_counter()
            if started is None:
                started = sent.get_nowait()
            if first is None:
                first = now
            got += 1
            if got == responses:
                firsts.append((first - started) * 1000.0)
                totals.append((now - started) * 1000.0)
                started = first = None
                got = 0
                sent.task_done()
                if len(totals) == requests:
                    break
    return {"first_ms": statistics.median(firsts), "total_ms": statistics.median(totals)}


def summarize(rounds: list[Json]) -> Json:
    summary: Json = {}
    for key in FIGURES:
        summary[key] = {p: spread([r[p][key] for r in rounds]) for p in PATHS}
        for path in ("node", "hop"):
            summary[key][f"{path}/direct"] = spread([r[path][key] / r["direct"][key] for r in rounds])
        summary[key]["hop/node"] = spread([r["hop"][key] / r["node"][key] for r in rounds])
    return summary


def run(args: argparse.Namespace, signals: Signals) -> Json:
    config: Json = {k: getattr(args, k) for k in ("rounds", "requests", "responses", "warmup", "grpc_server")}
    config["loadavg_1m_before"] = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        repo = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshserve-streaming-bench-")))
        write_python_repeat(repo, MODEL)
        etcd = signals.start(stack, EtcdProcess.start, EtcdProcess.stop)
        nodes = []
        for name, capacity in (("n0", "1GiB"), ("n1", "1KiB")):
            triton = signals.start(stack, lambda: TritonProcess.start(repo), TritonProcess.stop)
            nodes.append(signals.start(stack, functools.partial(
                NodeProcess.start, etcd=etcd.endpoint, model_repository=repo, capacity=capacity,
                etcd_prefix="streaming-bench", extra_args=[
                    "--instance-id", name, "--runtime", "triton", "--triton-url", triton.grpc_target,
                    "--triton-model-repository", str(repo), "--no-proactive-loads",
                    "--grpc-server", args.grpc_server]), NodeProcess.stop))
            if name == "n0":
                direct = triton.grpc_target
        targets = {"direct": direct, "node": nodes[0].target, "hop": nodes[1].target}
        _log(f"paths: {targets}")
        try:
            # Through the node first: its first request loads the model in its Triton, which serves "direct" too.
            for path in ("node", "direct", "hop"):
                asyncio.run(one_path(targets[path], args.warmup, args.responses))
            rounds = []
            order = list(PATHS)
            for index in range(args.rounds):
                turn = order[index % 3:] + order[:index % 3]
                rounds.append({p: asyncio.run(one_path(targets[p], args.requests, args.responses)) for p in turn})
                _log(f"round {index + 1}/{args.rounds}: " + ", ".join(
                    f"{p} {r['first_ms']:.2f}/{r['total_ms']:.2f} ms" for p, r in rounds[-1].items()))
        except Exception:
            for node in nodes:
                _log(f"node log tail:\n{node.log()}")
            raise
    config["loadavg_1m_after"] = os.getloadavg()[0]
    return {"config": config, "summary": summarize(rounds), "rounds": rounds}


def format_report(result: Json) -> str:
    c, s = result["config"], result["summary"]
    rows = [("figure", *PATHS, "node/direct", "hop/direct", "hop/node")]
    rows += [(label, *(cell(s[key][p]) for p in PATHS), *(cell(s[key][r]) for r in ("node/direct", "hop/direct",
                                                                                       "hop/node")))
             for key, label in FIGURES.items()]
    lines = [f"a decoupled model (Python backend) streaming {c['responses']} responses per request, one request at a "
             f"time on one stream, nodes on {c['grpc_server']} gRPC servers; {c['rounds']} interleaved rounds of "
             f"{c['requests']} requests per path; medians (min-max over rounds), ratios paired per round; 1-min load "
             f"average {c['loadavg_1m_before']:.1f} before, {c['loadavg_1m_after']:.1f} after",
             "paths: " + "; ".join(f"{p}: {label}" for p, label in PATHS.items()), ""]
    return "\n".join(lines + table(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds; a multiple of 3 rotates fairly")
    parser.add_argument("--requests", type=int, default=30, help="requests per round and path (default 30)")
    parser.add_argument("--responses", type=int, default=100, help="responses per request (default 100)")
    parser.add_argument("--warmup", type=int, default=5, help="requests per path before measuring")
    parser.add_argument("--quick", action="store_true", help="tiny counts for a smoke test (noise)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--grpc-server", choices=("aio", "threaded"), default="threaded",
                        help="the nodes' gRPC server (default threaded, the node's)")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(rounds=1, requests=3, warmup=1)
    return report.main(args, lambda: run(args, Signals()), format_report, _log)


if __name__ == "__main__":
    sys.exit(main())
