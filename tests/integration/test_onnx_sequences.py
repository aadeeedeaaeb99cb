"""Sequences of an ONNX Runtime model with implicit state through a 3-node mesh: the node's runtime keeps each
sequence's state (the running sum) in the copy that started it, whichever node the client calls.

n0 and n1 hold a copy each of deploy.local.models.write_accumulator (Triton's simple_sequence as an ONNX graph with
START and CORRID controls and a state pair); n2 has no room for a copy and forwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from deploy.local.models import write_accumulator
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from tests.integration.conftest import start_node
from tests.integration.helpers import wait_until_blocking
from tests.integration.sequence_support import ids_held_by, sequence_step

pytestmark = pytest.mark.timeout(120)
MODEL = "onnx_sequence"


@pytest.fixture(scope="module")
def nodes(etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    repo = tmp_path_factory.mktemp("onnx-sequence-repo")
    write_accumulator(repo, MODEL, idle_us=60_000_000)
    prefix = f"oseq-{uuid.uuid4().hex[:8]}"
    started: dict[str, NodeProcess] = {}
    try:
        for name, capacity in (("n0", "1GiB"), ("n1", "1GiB"), ("n2", "1KiB")):
            started[name] = start_node(etcd, repo, capacity=capacity, prefix=prefix,
                                       extra_args=["--instance-id", name, "--no-proactive-loads"])
        for holder in ("n0", "n1"):
            with grpcclient.InferenceServerClient(started[holder].target) as client:
                client.load_model(MODEL)
        with grpcclient.InferenceServerClient(started["n2"].target) as client:
            wait_until_blocking(lambda: client.is_model_ready(MODEL), 30, "n2 to see the copies")
        yield started
    finally:
        for node in started.values():
            node.stop()


@pytest.fixture
def clients(nodes: dict[str, NodeProcess]) -> Iterator[dict[str, grpcclient.InferenceServerClient]]:
    opened = {name: grpcclient.InferenceServerClient(node.target) for name, node in nodes.items()}
    yield opened
    for client in opened.values():
        client.close()


def send(client: grpcclient.InferenceServerClient, sequence_id: int, value: int, *, start: bool = False,
         end: bool = False) -> int:
    result = sequence_step(client, MODEL, sequence_id, value, start=start, end=end)
    assert result.as_numpy("STATE_OUT") is None  # the state stays in the copy
    return int(result.as_numpy("OUTPUT")[0][0])


def test_running_sums_through_varying_nodes(clients: dict[str, grpcclient.InferenceServerClient]) -> None:
    sequences = ids_held_by("n0", 2) + ids_held_by("n1", 2)  # both copies hold some
    order = list(clients)
    sums = dict.fromkeys(sequences, 0)
    for step in range(6):  # interleaved, each request through another node than the last
        for k, sequence_id in enumerate(sequences):
            value = 10 * k + step + 1
            sums[sequence_id] += value
            via = clients[order[(step + k) % 3]]
            assert send(via, sequence_id, value, start=step == 0, end=step == 5) == sums[sequence_id], (step, k)


def test_two_sequences_on_one_copy_interleaved_keep_their_own_sums(
        clients: dict[str, grpcclient.InferenceServerClient]) -> None:
    first, second = ids_held_by("n1", 2)
    assert send(clients["n2"], first, 1, start=True) == 1
    assert send(clients["n0"], second, 100, start=True) == 100
    assert send(clients["n1"], first, 2) == 3
    assert send(clients["n2"], second, 200) == 300
    assert send(clients["n0"], first, 3, end=True) == 6
    assert send(clients["n1"], second, 300, end=True) == 600
    assert send(clients["n2"], first, 7, start=True) == 7  # the same id again: a new sequence from zero


def test_a_request_of_a_sequence_never_started_gets_tritons_words(
        clients: dict[str, grpcclient.InferenceServerClient]) -> None:
    with pytest.raises(InferenceServerException) as caught:
        send(clients["n2"], 987_654, 1)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert (f"inference request for sequence 987654 to model '{MODEL}' must specify the START flag on the first "
            "request of the sequence") in (caught.value.message() or "")


def test_a_request_without_a_sequence_gets_tritons_words(clients: dict[str, grpcclient.InferenceServerClient]) -> None:
    tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[1]], np.int32))
    with pytest.raises(InferenceServerException) as caught:
        clients["n0"].infer(MODEL, [tensor], client_timeout=30)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert (f"inference request to model '{MODEL}' must specify a non-zero or non-empty correlation ID"
            in (caught.value.message() or "")), caught.value.message()
