"""A Triton killed under load: the node beside it withdraws its copies and routes every request to a node
whose Triton is up, says NOT_SERVING for its runtime while its port stays up, and rejoins once its Triton
is back. No request is lost while another node can serve."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from deploy.local.triton_models import write_python_add_sub
from meshnode.local.mesh import LocalMesh
from meshnode.net import transport
from meshnode.net.health import Health
from tests.integration.helpers import wait_until

WIDTH = 16
RUNTIME = Health.RUNTIME_SERVICE

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    repo = tmp_path / "models"
    write_python_add_sub(repo, "add", width=WIDTH)
    with LocalMesh.start(nodes=2, model_repository=repo, capacity="1GiB", log_dir=tmp_path / "logs", triton=True,
                         extra_args=["--no-proactive-loads"]) as started:
        yield started


async def health(target: str, service: str) -> int:
    async with transport.create_channel(target) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(answer.status)


async def add(client: aioclient.InferenceServerClient, a: np.ndarray) -> None:
    inputs = []
    for name, value in (("INPUT0", a), ("INPUT1", np.ones_like(a))):
        tensor = aioclient.InferInput(name, list(value.shape), "FP32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    result = await client.infer("add", inputs, client_timeout=30)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + 1)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - 1)


async def test_a_killed_triton_loses_no_request_and_its_node_rejoins_when_it_returns(mesh: LocalMesh) -> None:
    near, far = mesh.targets()
    async with aioclient.InferenceServerClient(near) as client:
        await client.load_model("add")  # the copy sits beside node-0's Triton
        await add(client, np.zeros((1, WIDTH), np.float32))
        assert await health(near, RUNTIME) == health_pb2.HealthCheckResponse.SERVING

        failures: list[str] = []
        answered = 0
        stop = asyncio.Event()

        async def steady_load() -> None:  # requests one after another through node-0, bounded in time
            nonlocal answered
            deadline = time.monotonic() + 60
            i = 0
            while not stop.is_set() and time.monotonic() < deadline:
                i += 1
                try:
                    await add(client, np.full((1, WIDTH), float(i), np.float32))
                    answered += 1
                except InferenceServerException as error:
                    failures.append(f"{error.status()}: {error.message()}")

        load = asyncio.create_task(steady_load())
        await wait_until(lambda: answered >= 20, 30, "answers before the fault")
        mesh.tritons[0].kill()
        down_at = time.monotonic()

        async def runtime_not_serving() -> bool:
            return await health(near, RUNTIME) == health_pb2.HealthCheckResponse.NOT_SERVING

        await wait_until(runtime_not_serving, 10, "node-0 to say its runtime is not serving")
        assert await health(near, "") == health_pb2.HealthCheckResponse.SERVING  # it still routes
        served = answered
        await wait_until(lambda: answered >= served + 20, 30, "answers through node-0 while its Triton is dead")
        took_over = time.monotonic() - down_at

        await asyncio.to_thread(mesh.tritons[0].start_again)

        async def runtime_serving() -> bool:
            return await health(near, RUNTIME) == health_pb2.HealthCheckResponse.SERVING

        await wait_until(runtime_serving, 15, "node-0 to rejoin once its Triton is back")
        stop.set()
        await load

    assert failures == [], failures
    assert took_over < 30
    async with aioclient.InferenceServerClient(far) as other:  # the copy moved beside node-1's Triton
        index = {m.name: m for m in (await other.get_model_repository_index()).models}
    assert index["add"].state == "READY" and "node-1 (loaded)" in index["add"].reason, index["add"]
    async with aioclient.InferenceServerClient(mesh.tritons[0].grpc_target) as triton:
        assert not await triton.is_model_ready("add")  # node-0's Triton came back empty, and nothing stale
