"""Load generator: stock tritonclient.grpc.aio in its own process, so its CPU is not the server's.

Two ways to drive it, both answering JSON:
- one shot: `python -m bench.loadgen --target HOST:PORT --model mlp --op latency --requests 2000`
- `--commands`: one JSON command per stdin line, one JSON answer per stdout line; the bench keeps
  one such process for a whole run so clients and connections outlive each round.

Ops (every one bounded in count and time):
- warmup: server live, model ready, metadata -> input spec, `requests` inferences, first answer back
- latency: `requests` sequential inferences (c=1), p50/p99
- throughput: `concurrency` callers for `seconds`, req/s
- cold: RepositoryModelLoad of `model`, then one inference shaped like `like`; both timed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.grpc import InferInput

REQUEST_TIMEOUT_S = 10.0
# A c=1 phase may take at most this long whatever `requests` says; the answer reports how many ran.
LATENCY_LIMIT_S = 120.0
SEED = 1234

Result = dict[str, Any]


def _percentiles_ms(latencies_s: list[float]) -> Result:
    if not latencies_s:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    ms = np.asarray(latencies_s) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max())}


class LoadGen:
    def __init__(self) -> None:
        self._clients: dict[str, triton.InferenceServerClient] = {}
        self._inputs: dict[tuple[str, str], list[InferInput]] = {}

    def _client(self, target: str) -> triton.InferenceServerClient:
        if target not in self._clients:
            self._clients[target] = triton.InferenceServerClient(target)
        return self._clients[target]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    async def run(self, command: Result) -> Result:
        op = command["op"]
        target, model = command["target"], command["model"]
        if op == "warmup":
            return await self.warmup(target, model, int(command.get("requests", 100)))
        if op == "latency":
            return await self.latency(target, model, int(command["requests"]))
        if op == "throughput":
            return await self.throughput(target, model, int(command.get("concurrency", 16)),
                                         float(command["seconds"]))
        if op == "cold":
            return await self.cold(target, model, command["like"])
        raise ValueError(f"unknown op {op!r}")

    async def _infer(self, target: str, model: str, like: str | None = None) -> Any:
        inputs = self._inputs[(target, like or model)]
        return await self._client(target).infer(model, inputs, client_timeout=REQUEST_TIMEOUT_S)

    async def warmup(self, target: str, model: str, requests: int) -> Result:
        client = self._client(target)
        if not await client.is_server_live(client_timeout=REQUEST_TIMEOUT_S):
            raise RuntimeError(f"{target} is not live")
        if not await client.is_model_ready(model, client_timeout=REQUEST_TIMEOUT_S):
            raise RuntimeError(f"model {model} is not ready on {target}")
        metadata = await client.get_model_metadata(model, client_timeout=REQUEST_TIMEOUT_S)
        rng = np.random.default_rng(SEED)
        inputs = []
        for spec in metadata.inputs:
            shape = [1 if d < 0 else d for d in spec.shape]
            tensor = InferInput(spec.name, shape, spec.datatype)
            tensor.set_data_from_numpy(rng.standard_normal(shape).astype(np.float32))
            inputs.append(tensor)
        self._inputs[(target, model)] = inputs
        first = await self._infer(target, model)
        for _ in range(requests - 1):
            await self._infer(target, model)
        outputs = {o.name: first.as_numpy(o.name).tolist() for o in metadata.outputs}
        return {"op": "warmup", "requests": requests, "outputs": outputs}

    async def latency(self, target: str, model: str, requests: int) -> Result:
        latencies: list[float] = []
        errors: list[str] = []
        cpu0 = time.process_time()
        limit = time.perf_counter() + LATENCY_LIMIT_S
        for _ in range(requests):
            started = time.perf_counter()
            try:
                await self._infer(target, model)
            except Exception as error:  # counted and reported: one bad answer must not lose the phase
                errors.append(str(error))
            else:
                latencies.append(time.perf_counter() - started)
            if started > limit:
                break
        done = len(latencies) + len(errors)
        return {"op": "latency", "concurrency": 1, "requests": len(latencies), "errors": len(errors),
                "first_error": errors[0] if errors else None,
                "client_cpu_us_per_req": (time.process_time() - cpu0) * 1e6 / max(done, 1),
                **_percentiles_ms(latencies)}

    async def throughput(self, target: str, model: str, concurrency: int, seconds: float) -> Result:
        latencies: list[float] = []
        errors: list[str] = []
        deadline = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    await self._infer(target, model)
                except Exception as error:
                    errors.append(str(error))
                else:
                    latencies.append(time.perf_counter() - started)

        cpu0 = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        done = len(latencies) + len(errors)
        return {"op": "throughput", "concurrency": concurrency, "seconds": elapsed,
                "requests": len(latencies), "errors": len(errors),
                "first_error": errors[0] if errors else None, "rps": len(latencies) / elapsed,
                "client_cpu_us_per_req": (time.process_time() - cpu0) * 1e6 / max(done, 1),
                **_percentiles_ms(latencies)}

    async def cold(self, target: str, model: str, like: str) -> Result:
        started = time.perf_counter()
        await self._client(target).load_model(model, client_timeout=REQUEST_TIMEOUT_S * 6)
        loaded = time.perf_counter()
        await self._infer(target, model, like)
        answered = time.perf_counter()
        return {"op": "cold", "model": model, "load_s": loaded - started, "first_infer_s": answered - loaded,
                "total_s": answered - started}


async def _serve_commands(gen: LoadGen) -> None:
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        try:
            answer = await gen.run(json.loads(line))
        except Exception as error:  # the bench decides what a failed op means
            answer = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer), flush=True)


async def _main(args: argparse.Namespace) -> None:
    gen = LoadGen()
    try:
        if args.commands:
            await _serve_commands(gen)
            return
        base = {"target": args.target, "model": args.model}
        await gen.warmup(args.target, args.model, args.warmup)
        command = {**base, "op": args.op, "requests": args.requests, "seconds": args.seconds,
                   "concurrency": args.concurrency}
        print(json.dumps(await gen.run(command), indent=2))
    finally:
        await gen.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--commands", action="store_true", help="read JSON commands from stdin")
    parser.add_argument("--target", help="HOST:PORT (one-shot mode)")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--op", choices=("latency", "throughput"), default="latency")
    parser.add_argument("--warmup", type=int, default=200, help="requests before measuring")
    parser.add_argument("--requests", type=int, default=2000, help="c=1 requests")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput duration")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    if not args.commands and not args.target:
        parser.error("--target is required without --commands")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
