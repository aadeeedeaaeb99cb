"""ModelStreamInfer through the mesh to a decoupled model on Triton (Triton's repeat_int32, Python backend).

n0 holds the model (its Triton); n1 has no room for any model and forwards the stream to n0. Through either node
the client sees what Triton sends: many responses per request, in order, Triton's final-response flag, responses
as the model produces them, and a client that cancels stops the model's work.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from deploy.local.triton_models import write_python_repeat
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from meshnode.local.triton import TritonProcess
from tests.integration.conftest import start_node
from tests.integration.helpers import wait_until_blocking

pytestmark = pytest.mark.timeout(120)
WAIT_S = 30.0
Result = tuple[grpcclient.InferResult | None, InferenceServerException | None]


@dataclass
class Mesh:
    holder: NodeProcess
    forwarder: NodeProcess
    marker: Path  # where the model notes each request it saw cancelled


@pytest.fixture(scope="module")
def mesh(etcd: EtcdProcess, tritons: Callable[[Path], TritonProcess],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    repo = tmp_path_factory.mktemp("repeat-repo")
    marker = tmp_path_factory.mktemp("marker") / "cancelled"
    write_python_repeat(repo, "repeat_int32", cancelled_marker=marker)
    prefix = f"stream-{uuid.uuid4().hex[:8]}"
    started: list[NodeProcess] = []
    try:
        for name, capacity in (("n0", "1GiB"), ("n1", "1KiB")):
            triton = tritons(repo)
            started.append(start_node(etcd, repo, capacity=capacity, prefix=prefix, extra_args=[
                "--instance-id", name, "--runtime", "triton", "--triton-url", triton.grpc_target,
                "--triton-model-repository", str(repo), "--no-proactive-loads"]))
        with grpcclient.InferenceServerClient(started[0].target) as client:
            client.load_model("repeat_int32")
        yield Mesh(started[0], started[1], marker)
    finally:
        for node in started:
            node.stop()


def repeat_inputs(values: list[int], delays_ms: list[int], wait_ms: int = 0) -> list[grpcclient.InferInput]:
    tensors = []
    for name, data in (("IN", np.array(values, np.int32)), ("DELAY", np.array(delays_ms, np.uint32)),
                       ("WAIT", np.array([wait_ms], np.uint32))):
        tensor = grpcclient.InferInput(name, list(data.shape), "INT32" if name == "IN" else "UINT32")
        tensor.set_data_from_numpy(data)
        tensors.append(tensor)
    return tensors


def take(results: queue.Queue[Result], count: int) -> list[Result]:
    return [results.get(timeout=WAIT_S) for _ in range(count)]


@pytest.mark.parametrize("through", ["holder", "forwarder"])
def test_a_decoupled_model_answers_many_times_per_request_with_tritons_final_flag(mesh: Mesh, through: str) -> None:
    results: queue.Queue[Result] = queue.Queue()
    with grpcclient.InferenceServerClient(getattr(mesh, through).target) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer("repeat_int32", repeat_inputs([7, 8, 9], [0, 0, 0]), request_id="a",
                                  enable_empty_final_response=True)
        client.async_stream_infer("repeat_int32", repeat_inputs([], []), request_id="none",
                                  enable_empty_final_response=True)
        client.async_stream_infer("nope", repeat_inputs([1], [0]), request_id="bad")
        got = take(results, 6)  # 3 + a final empty response for 'a', one final empty one for 'none', an error
        client.stop_stream()
    errors = [str(error) for _, error in got if error is not None]
    assert len(errors) == 1 and "Request for unknown model: 'nope' is not found" in errors[0]
    by_id: dict[str, list[tuple[int | None, bool]]] = {}
    for result, _ in got:
        if result is not None:
            response = result.get_response()
            out = result.as_numpy("OUT")
            by_id.setdefault(response.id, []).append(
                (None if out is None else int(out[0]), response.parameters["triton_final_response"].bool_param))
    assert by_id == {"a": [(7, False), (8, False), (9, False), (None, True)], "none": [(None, True)]}


def test_responses_flow_as_produced_and_a_cancelled_client_stops_the_work_at_the_copy(mesh: Mesh) -> None:
    results: queue.Queue[Result] = queue.Queue()
    with grpcclient.InferenceServerClient(mesh.forwarder.target) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        # The third response comes after 10 minutes: the first two can only arrive if they flow as produced.
        client.async_stream_infer("repeat_int32", repeat_inputs([1, 2, 3, 4], [0, 0, 600_000, 0]))
        first = take(results, 2)
        assert [int(result.as_numpy("OUT")[0]) for result, _ in first if result is not None] == [1, 2]
        client.stop_stream(cancel_requests=True)
    # The model looks for a cancellation while it waits for the third: the client's reaches it through both nodes.
    wait_until_blocking(lambda: _cancelled_at(mesh) == "2", WAIT_S, "the copy's model to see its request cancelled")


def _cancelled_at(mesh: Mesh) -> str:
    return mesh.marker.read_text().strip() if mesh.marker.exists() else ""
