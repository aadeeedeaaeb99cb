"""What bench/density.py measures from outside a mesh: the repository it serves, just-in-time latency of
random models, listing times, etcd's keys and size, each node's etcd writes and memory."""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from deploy.local.models import write_add_sub
from meshnode.control.repository_registration import REGISTERED
from meshnode.local.node import NodeProcess
from meshnode.net import transport
from meshpb import mpb

WIDTH = 16


def build_repository(root: Path, count: int) -> Path:
    """`count` models m0000000, m0000001, ...: each a symlink to one small ONNX model directory."""
    template = write_add_sub(root / "template", "model", width=WIDTH)
    repo = root / f"repo-{count}"
    repo.mkdir(parents=True)
    for i in range(count):
        os.symlink(template, repo / name_of(i))
    return repo


def name_of(i: int) -> str:
    return f"m{i:07d}"


def _inputs() -> list[grpcclient.InferInput]:
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = grpcclient.InferInput(name, [1, WIDTH], "FP32")
        tensor.set_data_from_numpy(np.ones((1, WIDTH), dtype=np.float32))
        inputs.append(tensor)
    return inputs


def latencies(targets: list[str], models: list[str], warm_repeats: int = 5) -> dict[str, float]:
    """p50 of the first request to each model (cold: loaded just in time) and of later ones (warm), in ms;
    the models are asked of the nodes in turn."""
    cold: list[float] = []
    warm: list[float] = []
    clients = [grpcclient.InferenceServerClient(t) for t in targets]
    inputs = _inputs()
    try:
        for i, model in enumerate(models):
            client = clients[i % len(clients)]
            for repeat in range(1 + warm_repeats):
                started = time.perf_counter()
                client.infer(model, inputs, client_timeout=60)
                (warm if repeat else cold).append((time.perf_counter() - started) * 1000)
    finally:
        for client in clients:
            client.close()
    return {"cold_p50_ms": statistics.median(cold), "warm_p50_ms": statistics.median(warm)}


def random_models(count: int, sample: int, rng: random.Random) -> list[str]:
    return [name_of(i) for i in rng.sample(range(count), min(sample, count))]


def listing_times(target: str, prefix: str) -> dict[str, float]:
    """Seconds to page through ListModels by `prefix` (1,000 a page) and to fetch RepositoryIndex of all."""

    async def pages() -> tuple[int, float]:
        async with transport.create_channel(target, options={"grpc.max_receive_message_length": 2**30}) as channel:
            stub = transport.ManagementStub(channel)
            request = mpb.ListModelsRequest(prefix=prefix, page_size=1000)
            started, listed = time.perf_counter(), 0
            while True:
                response = await stub.ListModels(request, timeout=120)
                listed += len(response.models)
                if not response.next_page_token:
                    return listed, time.perf_counter() - started
                request.page_token = response.next_page_token

    listed, paged_s = asyncio.run(pages())
    with grpcclient.InferenceServerClient(target) as client:
        started = time.perf_counter()
        index = client.get_model_repository_index(client_timeout=300)
        index_s = time.perf_counter() - started
    return {"listed_by_prefix": listed, "list_prefix_s": paged_s, "index_models": len(index.models),
            "index_s": index_s}


def _etcdctl(endpoint: str, *args: str) -> Any:
    """etcdctl's JSON answer (etcdctl from Debian's etcd-client)."""
    done = subprocess.run(["etcdctl", "--endpoints", endpoint, *args, "-w", "json"], env={**os.environ,
                          "ETCDCTL_API": "3"}, capture_output=True, text=True, check=True, timeout=120)
    return json.loads(done.stdout)


def etcd_keys(endpoint: str, prefix: str) -> int:
    """Keys under `prefix` in etcd."""
    return int(_etcdctl(endpoint, "get", "--prefix", prefix, "--limit", "1").get("count", 0))  # the range's count


def etcd_usage(endpoint: str, prefix: str) -> dict[str, int]:
    """Keys under the mesh's prefix and etcd's database size."""
    status = _etcdctl(endpoint, "endpoint", "status")[0]["Status"]
    return {"etcd_keys": etcd_keys(endpoint, f"{prefix}/"), "etcd_db_bytes": int(status["dbSize"])}


def wait_registered(endpoint: str, prefix: str, count: int, logs: list[Path], timeout_s: float) -> float:
    """Waits until the mesh under `prefix` has `count` models registered (the monotonic time it saw them), and
    then until every node's log says its registration is done (a node may still try batches others wrote)."""
    deadline = time.monotonic() + timeout_s

    def wait(done: Callable[[], bool], what: str) -> None:
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not within {timeout_s} s")
            time.sleep(0.2)

    wait(lambda: etcd_keys(endpoint, f"{prefix}/models/") >= count, f"{count} models registered")
    registered = time.monotonic()
    wait(lambda: all(REGISTERED in log.read_text(errors="replace") for log in logs), "every node's registration")
    return registered


def etcd_writes(node: NodeProcess) -> int:
    """meshserve_etcd_writes of the node, from its /metrics."""
    with urllib.request.urlopen(f"http://{node.host}:{node.metrics_port}/metrics", timeout=30) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("meshserve_etcd_writes"):
                return int(float(line.split()[-1]))
    raise RuntimeError(f"no meshserve_etcd_writes in the metrics of {node.instance_id}")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def lease_losses(log_files: list[Path]) -> int:
    """Lines in the nodes' logs saying their lease expired (peers saw the node leave although it ran on)."""
    lost = 0
    for path in log_files:
        text = path.read_text(errors="replace") if path.exists() else ""
        lost += text.count("expired; granting a new one")
    return lost
