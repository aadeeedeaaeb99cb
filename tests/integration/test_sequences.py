"""Sequences through a 3-node mesh of Triton nodes: each sequence's requests reach the one copy holding its
state, from whichever node the client calls; a sequence whose copy went away is told so.

n0 and n1 hold a copy each of a stateful model (Triton's simple_sequence: a running sum per sequence, Python
backend); n2 has no room for a copy and forwards.
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

from deploy.local.triton_models import write_python_sequence
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from meshnode.local.triton import TritonProcess
from tests.integration.conftest import start_node
from tests.integration.helpers import wait_until_blocking
from tests.integration.sequence_support import ids_held_by, sequence_step

pytestmark = pytest.mark.timeout(120)
MODEL = "simple_sequence"


@dataclass
class Mesh:
    nodes: dict[str, NodeProcess]

    def client(self, name: str) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(self.nodes[name].target)


@pytest.fixture(scope="module")
def mesh(etcd: EtcdProcess, tritons: Callable[[Path], TritonProcess],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    repo = tmp_path_factory.mktemp("sequence-repo")
    write_python_sequence(repo, MODEL, idle_us=60_000_000)
    prefix = f"seq-{uuid.uuid4().hex[:8]}"
    nodes: dict[str, NodeProcess] = {}
    try:
        for name, capacity in (("n0", "1GiB"), ("n1", "1GiB"), ("n2", "1KiB")):
            triton = tritons(repo)
            nodes[name] = start_node(etcd, repo, capacity=capacity, prefix=prefix, extra_args=[
                "--instance-id", name, "--runtime", "triton", "--triton-url", triton.grpc_target,
                "--triton-model-repository", str(repo), "--no-proactive-loads"])
        for holder in ("n0", "n1"):
            with grpcclient.InferenceServerClient(nodes[holder].target) as client:
                client.load_model(MODEL)
        with grpcclient.InferenceServerClient(nodes["n2"].target) as client:
            wait_until_blocking(lambda: client.is_model_ready(MODEL), 30, "n2 to see the copies")
        yield Mesh(nodes)
    finally:
        for node in nodes.values():
            node.stop()


def send(client: grpcclient.InferenceServerClient, sequence_id: int, value: int, *, start: bool = False,
         end: bool = False) -> int:
    return int(sequence_step(client, MODEL, sequence_id, value, start=start, end=end).as_numpy("OUTPUT")[0][0])


def test_each_sequence_keeps_its_copy_from_whichever_node_is_called(mesh: Mesh) -> None:
    sequences = ids_held_by("n0", 2) + ids_held_by("n1", 2)  # both copies hold some
    clients = {name: mesh.client(name) for name in mesh.nodes}
    try:
        order = list(clients)
        sums = dict.fromkeys(sequences, 0)
        for step in range(6):  # interleaved, each request through another node than the last
            for k, sequence_id in enumerate(sequences):
                value = 10 * k + step + 1
                sums[sequence_id] = value if step == 0 else sums[sequence_id] + value
                via = clients[order[(step + k) % 3]]
                assert send(via, sequence_id, value, start=step == 0, end=step == 5) == sums[sequence_id]
    finally:
        for client in clients.values():
            client.close()


def test_sequences_on_one_stream_reach_their_copies_in_order(mesh: Mesh) -> None:
    sequences = ids_held_by("n0", 1) + ids_held_by("n1", 1)
    results: queue.Queue[tuple[grpcclient.InferResult | None, InferenceServerException | None]] = queue.Queue()
    with mesh.client("n2") as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for step in range(4):
            for k, sequence_id in enumerate(sequences):
                tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
                tensor.set_data_from_numpy(np.array([[k + 1]], np.int32))
                client.async_stream_infer(MODEL, [tensor], request_id=f"{sequence_id}/{step}", sequence_id=sequence_id,
                                          sequence_start=step == 0, sequence_end=step == 3)
        got = [results.get(timeout=30) for _ in range(8)]
        client.stop_stream()
    assert [error for _, error in got if error is not None] == []
    sums = {result.get_response().id: int(result.as_numpy("OUTPUT")[0][0]) for result, _ in got if result is not None}
    assert sums == {f"{s}/{step}": (k + 1) * (step + 1) for k, s in enumerate(sequences) for step in range(4)}


def test_a_request_of_a_sequence_never_started_gets_tritons_words(mesh: Mesh) -> None:
    with mesh.client("n2") as client, pytest.raises(InferenceServerException) as caught:
        send(client, 987_654, 1)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert (f"inference request for sequence 987654 to model '{MODEL}' must specify the START flag on the first "
            "request of the sequence") in (caught.value.message() or "")


def test_a_sequence_whose_copy_went_away_is_told_its_state_is_lost(mesh: Mesh) -> None:
    (sequence_id,) = ids_held_by("n1", 1)
    with mesh.client("n2") as client:
        assert send(client, sequence_id, 5, start=True) == 5
        assert send(client, sequence_id, 2) == 7
        mesh.nodes["n1"].stop()  # its copy, and the sequence's state, go with it
        # Whether n2's view still lists n1's copy (unreachable: the next is tried) or not, the answer is the same.
        with pytest.raises(InferenceServerException) as caught:
            send(client, sequence_id, 1)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "lost its state with its copy" in (caught.value.message() or ""), caught.value.message()

