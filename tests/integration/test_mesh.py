"""Three node processes and one etcd form a mesh: any node serves any model, failures retry elsewhere."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient

from deploy.local.models import mlp_reference, write_mlp
from meshnode.local.mesh import LocalMesh
from tests.integration.helpers import metric, wait_until

MODELS = [f"m{i}" for i in range(6)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mesh-repo")
    for i, name in enumerate(MODELS):
        write_mlp(root, name, approx_bytes=200_000, seed=i)
    write_mlp(root, "cold", approx_bytes=200_000, seed=99)
    return root


@pytest.fixture
def mesh(repo: Path, tmp_path: Path) -> Iterator[LocalMesh]:
    # The tests count loads caused by requests: no proactive loads.
    with LocalMesh.start(nodes=3, model_repository=repo, capacity="64MiB", log_dir=tmp_path,
                         extra_args=["--no-proactive-loads"]) as started:
        yield started


def x_input(x: np.ndarray) -> list[aioclient.InferInput]:
    inp = aioclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def total(mesh: LocalMesh, name: str) -> float:
    return sum(metric(node, name) for node in mesh.nodes if node.process.poll() is None)


async def test_every_model_answers_correctly_through_every_node(mesh: LocalMesh, repo: Path) -> None:
    x = np.random.default_rng(3).standard_normal((2, 16), dtype=np.float32)
    for target in mesh.targets():
        async with aioclient.InferenceServerClient(target) as client:
            for name in MODELS:
                out = (await client.infer(name, x_input(x))).as_numpy("OUTPUT0")
                np.testing.assert_allclose(out, mlp_reference(repo / name, x), rtol=1e-4, atol=1e-5)
    # Each model was loaded once in the mesh and then served from that copy, wherever asked.
    assert total(mesh, "modelmesh_loadmodel_total") == len(MODELS)
    async with aioclient.InferenceServerClient(mesh.targets()[0]) as client:
        index = {m.name: m for m in (await client.get_model_repository_index()).models}
    assert all(index[name].state == "READY" and "copies: node-" in index[name].reason for name in MODELS)


async def test_metadata_through_any_node_comes_from_the_one_copy(mesh: LocalMesh) -> None:
    async with aioclient.InferenceServerClient(mesh.targets()[0]) as client:
        await client.infer("m0", x_input(np.ones((1, 16), np.float32)))
    for target in mesh.targets():
        async with aioclient.InferenceServerClient(target) as client:
            meta = await client.get_model_metadata("m0", as_json=True)
            assert meta["inputs"][0]["name"] == "INPUT0"
    assert total(mesh, "modelmesh_loadmodel_total") == 1  # nobody loaded a copy to answer metadata


async def test_concurrent_cold_requests_through_all_nodes_cause_one_load(mesh: LocalMesh) -> None:
    x = np.ones((1, 16), np.float32)
    clients = [aioclient.InferenceServerClient(t) for t in mesh.targets()]
    try:
        results = await asyncio.gather(*(c.infer("cold", x_input(x)) for c in clients for _ in range(8)))
    finally:
        for c in clients:
            await c.close()
    assert len({r.as_numpy("OUTPUT0").tobytes() for r in results}) == 1
    assert total(mesh, "modelmesh_loadmodel_total") == 1


async def _use_every_model_through_every_node(mesh: LocalMesh, x: np.ndarray) -> None:
    for target in mesh.targets():
        async with aioclient.InferenceServerClient(target) as client:
            for name in MODELS:
                await client.infer(name, x_input(x))


async def _steady_load(targets: list[str], seconds: float, errors: list[str], answered: list[int]) -> None:
    x = np.ones((1, 16), np.float32)

    async def worker(i: int) -> None:
        async with aioclient.InferenceServerClient(targets[i % len(targets)]) as client:
            deadline = time.monotonic() + seconds
            n = i
            while time.monotonic() < deadline:
                name = MODELS[n % len(MODELS)]
                n += 1
                try:
                    await client.infer(name, x_input(x), client_timeout=20)
                    answered[0] += 1
                except Exception as error:  # every failure is a lost request
                    errors.append(f"{name}: {error}")

    await asyncio.gather(*(worker(i) for i in range(8)))


async def test_kill_minus_nine_of_a_node_under_load_loses_no_request(mesh: LocalMesh) -> None:
    victim, survivors = mesh.nodes[2], mesh.targets()[:2]
    x = np.ones((1, 16), np.float32)
    async with aioclient.InferenceServerClient(victim.target) as client:
        for name in MODELS[:3]:  # RepositoryModelLoad loads on the node asked: copies the survivors must replace
            await client.load_model(name)
        for name in MODELS:
            await client.infer(name, x_input(x))
    assert metric(victim, "modelmesh_instance_models_total") >= 3
    errors: list[str] = []
    answered = [0]
    load = asyncio.ensure_future(_steady_load(survivors, 8.0, errors, answered))
    await wait_until(lambda: answered[0] >= 50, 5, "the survivors to answer 50 requests before the kill")
    victim.kill()
    await load
    assert errors == []
    assert answered[0] > 100


async def test_etcd_restart_loses_no_request_for_loaded_models_and_no_registration(mesh: LocalMesh) -> None:
    x = np.ones((1, 16), np.float32)
    await _use_every_model_through_every_node(mesh, x)
    errors: list[str] = []
    answered = [0]
    load = asyncio.ensure_future(_steady_load(mesh.targets(), 8.0, errors, answered))
    await wait_until(lambda: answered[0] >= 50, 5, "the nodes to answer 50 requests before etcd goes")
    await asyncio.to_thread(mesh.etcd.restart_after, 3.0)
    await load
    assert errors == []
    async with aioclient.InferenceServerClient(mesh.targets()[1]) as client:
        names = {m.name for m in (await client.get_model_repository_index()).models}
    assert names >= set(MODELS)


def _balancer_connection(target: str) -> aioclient.InferenceServerClient:
    # A connection of its own: grpc-core otherwise shares subchannels between channels to one address,
    # and a fresh connection to a restarted node could inherit one to its previous process.
    return aioclient.InferenceServerClient(target, channel_args=[("grpc.use_local_subchannel_pool", 1)])


async def _ready_client(target: str) -> aioclient.InferenceServerClient:
    """A connection that passed a readiness probe, as a balancer requires before routing to a backend."""
    for _ in range(10):
        client = _balancer_connection(target)
        try:
            if await client.is_server_ready(client_timeout=2):
                return client
        except Exception:
            pass
        await client.close()
    raise AssertionError(f"{target} never became ready")


async def test_a_rolling_restart_of_every_node_loses_no_request(mesh: LocalMesh) -> None:
    """Clients reach the nodes that are up, as a load balancer would; every node restarts in turn."""
    x = np.ones((1, 16), np.float32)
    await _use_every_model_through_every_node(mesh, x)
    began = time.monotonic()
    errors: list[str] = []
    answered = [0]
    stop = asyncio.Event()
    # The balancer's connections: a node leaving rotation has its connection closed once its calls end,
    # and a node rejoining gets a fresh one, as a real balancer does.
    pool: dict[int, aioclient.InferenceServerClient] = {
        i: _balancer_connection(t) for i, t in enumerate(mesh.targets())}

    in_flight = dict.fromkeys(pool, 0)
    answered_by = dict.fromkeys(pool, 0)

    async def worker(w: int) -> None:
        n = w
        while not stop.is_set():
            up = sorted(pool)
            node = up[n % len(up)]
            client, name = pool[node], MODELS[n % len(MODELS)]
            n += 1
            in_flight[node] += 1
            try:
                await client.infer(name, x_input(x), client_timeout=20, request_id=f"w{w}-{n}")
                answered[0] += 1
                answered_by[node] += 1
            except Exception as error:
                errors.append(f"node-{node} {name} w{w}-{n} at {time.monotonic() - began:.1f}s: {error}")
            finally:
                in_flight[node] -= 1

    workers = [asyncio.ensure_future(worker(w)) for w in range(6)]
    try:
        for i in range(len(mesh.nodes)):
            leaving = pool.pop(i)  # out of rotation before the node is told to stop
            # Connection draining: its calls finish before it closes.
            await wait_until(lambda node=i: in_flight[node] == 0, 20, f"node-{i}'s calls to finish")
            await leaving.close()
            await asyncio.to_thread(mesh.restart, i)
            answered_by[i] = 0
            pool[i] = await _ready_client(mesh.nodes[i].target)
            # Back in rotation and serving before the next node leaves, as a rolling update waits for.
            await wait_until(lambda node=i: answered_by[node] >= 50, 20,
                             f"the restarted node-{i} to answer 50 requests")
    finally:
        stop.set()
        await asyncio.gather(*workers)
        for client in pool.values():
            await client.close()
    assert errors == []
    assert answered[0] > 100
