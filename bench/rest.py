"""KServe v2 REST infer: a node's `--http-port` against Triton's HTTP endpoint, MLServer's REST and a floor.

The same 1 MB MLP (INPUT0 FP32 [1, 16] -> OUTPUT0 FP32 [1, 4]) on four servers started here: a node
(ONNX Runtime in process), Triton 2.51 (`make triton`; its Python backend running ONNX Runtime, the only
backend that package ships), MLServer 1.7.1 (a custom runtime running ONNX Runtime; parallel workers,
metrics and debug off; in a venv of its own, made once with `python3 -m venv .mlserver-venv &&
.mlserver-venv/bin/pip install mlserver==1.7.1 onnxruntime==1.31.1 'uvloop<0.22'`: MLServer 1.7.1 breaks
with uvloop >= 0.22; skipped when that venv is missing) and the floor: a bare aiohttp handler running the
session inline, what any Python REST server costs. One load generator (an aiohttp client in this process;
the servers are children) sends the same JSON body to each, in interleaved rounds whose order rotates: c=1
(sequential, p50/p99) and c=16 (req/s). Ratios are paired within each round. Goals: the node's c=1 p50
within 1.2x of Triton's HTTP, and ahead of MLServer. Everything it starts stops on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.procs import Signals, cpu_seconds
from bench.triton_sidecar import process_tree
from deploy.local.models import write_mlp
from deploy.local.triton_models import write_python_onnx_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from meshnode.local.triton import TritonProcess

ROOT = Path(__file__).resolve().parents[1]
MLSERVER_PYTHON = ROOT / ".mlserver-venv" / "bin" / "python"
MODEL = "mlp"
P50_GOAL = 1.2  # node / Triton HTTP
BODY = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                               "data": np.random.default_rng(1).random(16).round(4).tolist()}]}).encode()
Json = dict[str, Any]
JSON = {"Content-Type": "application/json"}  # MLServer (FastAPI) refuses a body of another type

# The floor: the least a Python REST server can do per request (parse, run inline, answer).
FLOOR = r'''
import json, sys
import numpy as np, onnxruntime as ort
from aiohttp import web
options = ort.SessionOptions(); options.intra_op_num_threads = 1; options.inter_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
async def infer(request):
    body = json.loads(await request.read())
    x = np.asarray(body["inputs"][0]["data"], np.float32).reshape(body["inputs"][0]["shape"])
    (y,) = session.run(None, {"INPUT0": x})
    return web.json_response({"model_name": "mlp", "outputs": [
        {"name": "OUTPUT0", "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}]})
app = web.Application(); app.router.add_post("/v2/models/mlp/infer", infer)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None)
'''
# MLServer's custom runtime: ONNX Runtime on the same file, numpy in and out through MLServer's codecs.
MLSERVER_RUNTIME = r'''
import numpy as np, onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

class OnnxMlp(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions(); options.intra_op_num_threads = 1; options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(self.settings.parameters.uri, options,
                                             providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        (y,) = self._session.run(None, {"INPUT0": x})
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("OUTPUT0", y)])
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def child(args: list[str], cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def mlserver_dir(work: Path, model_file: Path, http_port: int) -> Path:
    home = work / "mlserver"
    (home / MODEL).mkdir(parents=True)
    (home / "onnx_mlp.py").write_text(MLSERVER_RUNTIME)
    (home / "settings.json").write_text(json.dumps({
        "http_port": http_port, "grpc_port": free_port(), "metrics_port": free_port(), "parallel_workers": 0,
        "metrics_endpoint": None, "debug": False, "host": "127.0.0.1"}))
    (home / MODEL / "model-settings.json").write_text(json.dumps({
        "name": MODEL, "implementation": "onnx_mlp.OnnxMlp", "parameters": {"uri": str(model_file)}}))
    return home


async def wait_ready(session: aiohttp.ClientSession, url: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.post(url, data=BODY, headers=JSON) as response:
                if response.status == 200:
                    await response.read()
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer an inference within {timeout_s:g} s")


async def latency(session: aiohttp.ClientSession, url: str, requests: int) -> list[float]:
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        async with session.post(url, data=BODY, headers=JSON) as response:
            await response.read()
            assert response.status == 200, response.status
        times.append(time.perf_counter() - started)
    return times


async def throughput(session: aiohttp.ClientSession, url: str, concurrency: int, seconds: float) -> float:
    done = 0
    end = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < end:
            async with session.post(url, data=BODY, headers=JSON) as response:
                await response.read()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


def server_cpu(pid: int) -> float:
    """CPU seconds of a server and its children so far (Triton's Python-backend stub runs the model)."""
    return sum(cpu_seconds(p) for p in process_tree(pid))


async def measure(urls: dict[str, str], pids: dict[str, int], args: argparse.Namespace) -> list[Json]:
    rounds: list[Json] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        for url in urls.values():
            await wait_ready(session, url)
            await latency(session, url, args.requests // 4)  # warm up
        names = list(urls)
        for index in range(args.rounds):
            order = names[index % len(names):] + names[:index % len(names)]
            result: Json = {}
            for name in order:
                times = np.asarray(await latency(session, urls[name], args.requests)) * 1000.0
                cpu = server_cpu(pids[name])
                rps = await throughput(session, urls[name], args.concurrency, args.seconds)
                # The server's CPU per request at c=16: what a request costs, whatever else ran meanwhile.
                cpu_us = (server_cpu(pids[name]) - cpu) / (rps * args.seconds) * 1e6
                result[name] = {"p50_ms": float(np.percentile(times, 50)),
                                "p99_ms": float(np.percentile(times, 99)), "rps": rps, "cpu_us": cpu_us}
            print(f"[rest] round {index + 1}: " + ", ".join(
                f"{n} p50 {r['p50_ms']:.3f} ms {r['rps']:.0f} req/s {r['cpu_us']:.0f} us/req"
                for n, r in result.items()),
                file=sys.stderr, flush=True)
            rounds.append(result)
    return rounds


def summarize(rounds: list[Json]) -> Json:
    summary: Json = {"rounds": rounds}
    for other in ("triton", "mlserver", "floor"):
        if other in rounds[0]:
            summary[f"node/{other}"] = {
                key: statistics.median(r["node"][key] / r[other][key] for r in rounds)
                for key in ("p50_ms", "p99_ms", "rps", "cpu_us")}
    summary["medians"] = {name: {key: statistics.median(r[name][key] for r in rounds) for key in rounds[0][name]}
                          for name in rounds[0]}
    if "node/triton" in summary:
        summary["p50_goal_met"] = summary["node/triton"]["p50_ms"] <= P50_GOAL
    if "node/mlserver" in summary:
        summary["ahead_of_mlserver"] = summary["node/mlserver"]["p50_ms"] < 1.0
    return summary


def run(args: argparse.Namespace) -> Json:
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        Signals().start(stack, lambda: None, lambda _: None)
        write_mlp(work / "repo", MODEL)
        model_file = work / "repo" / MODEL / "1" / "model.onnx"
        etcd = EtcdProcess.start()
        stack.callback(etcd.stop)
        node = NodeProcess.start(etcd=etcd.endpoint, model_repository=work / "repo", capacity="1GiB",
                                 metrics_port=0, extra_args=["--http-port", "0"])
        stack.callback(node.stop)
        match = re.search(r" http=(\S+:\d+)", node.log())
        assert match, node.log()
        urls = {"node": f"http://{match.group(1)}/v2/models/{MODEL}/infer"}
        pids = {"node": node.process.pid}
        floor_port = free_port()
        pids["floor"] = stack.enter_context(child([sys.executable, "-c", FLOOR, str(model_file),
                                                   str(floor_port)])).pid
        urls["floor"] = f"http://127.0.0.1:{floor_port}/v2/models/{MODEL}/infer"
        if not args.no_triton:
            write_python_onnx_mlp(work / "triton-repo", MODEL)
            triton = TritonProcess.start(work / "triton-repo")
            stack.callback(triton.stop)
            subprocess.run([sys.executable, "-c", "import sys, tritonclient.http as h; "
                            "h.InferenceServerClient(sys.argv[1]).load_model(sys.argv[2])",
                            f"127.0.0.1:{triton.http_port}", MODEL], check=True)
            urls["triton"] = f"http://127.0.0.1:{triton.http_port}/v2/models/{MODEL}/infer"
            pids["triton"] = triton.pid
        if MLSERVER_PYTHON.exists() and not args.no_mlserver:
            port = free_port()
            home = mlserver_dir(work, model_file, port)
            pids["mlserver"] = stack.enter_context(child(
                [str(MLSERVER_PYTHON), "-m", "mlserver.cli.main", "start", str(home)], home)).pid
            urls["mlserver"] = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
        return summarize(asyncio.run(measure(urls, pids, args)))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rest", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests per c=1 phase")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each c=16 phase")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--no-mlserver", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for name, figures in result["medians"].items():
        print(f"{name:9s} c=1 p50 {figures['p50_ms']:.3f} ms  p99 {figures['p99_ms']:.3f} ms  "
              f"c={args.concurrency} {figures['rps']:.0f} req/s, server CPU {figures['cpu_us']:.0f} us/req")
    for key in ("node/triton", "node/mlserver", "node/floor"):
        if key in result:
            ratio = result[key]
            print(f"{key:14s} p50 x{ratio['p50_ms']:.2f}  p99 x{ratio['p99_ms']:.2f}  req/s x{ratio['rps']:.2f}  "
                  f"CPU/req x{ratio['cpu_us']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
