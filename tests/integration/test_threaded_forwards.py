"""Forwards from the threaded server's polling threads (serving.threaded_forwards, issue 19) on real nodes.

Every node runs `--grpc-server threaded`. A client's plain request to a node without a copy, for a model whose
one loaded copy is on the other node (the holder), is forwarded from the polling thread that took it. Through
that node (the forwarder) the answers must be right and counted as on the loop's path, under the mesh proof or
peer mutual TLS, within the client's deadline, in one trace with the holder's spans; and when the holder dies,
the loop's router serves the requests anyway.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from deploy.local.models import mlp_reference, write_matmul_chain, write_mlp
from meshnode.local.certs import MeshCerts
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from tests.integration.helpers import metric, wait_until_blocking
from tests.integration.otlp_receiver import OtlpReceiver, otlp_receiver
from tests.integration.test_metrics_modelmesh import Samples, scrape
from tests.integration.test_tracing import CLIENT, FAST_EXPORT, INFER, SERVER, new_trace, one, received

MLP, SLOW = "mlp", "slow"
# The slow model of test_timeouts.py: one inference runs ~0.6 s on one core here.
SLOW_WIDTH, SLOW_DEPTH = 2048, 4
DEADLINE_S = 0.1
OK = {"method": "ModelInfer", "code": "OK"}
EXCEEDED = {"method": "ModelInfer", "code": "DEADLINE_EXCEEDED"}
# No load but the requests': placement puts each model on one node, and stays there however busy it is.
ARGS = ["--grpc-server", "threaded", "--no-proactive-loads", "--max-copies", "1"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("forwards-repo")
    write_mlp(root, MLP, approx_bytes=200_000)
    write_matmul_chain(root, SLOW, width=SLOW_WIDTH, depth=SLOW_DEPTH)
    return root


def start_pair(etcd: EtcdProcess, repo: Path, extra_args: list[str],
               env: dict[str, str] | None = None) -> list[NodeProcess]:
    prefix = f"forwards-{uuid.uuid4().hex[:8]}"
    nodes: list[NodeProcess] = []
    try:
        for name in ("n0", "n1"):
            nodes.append(NodeProcess.start(etcd=etcd.endpoint, model_repository=repo, capacity="512MiB",
                                           etcd_prefix=prefix, instance_id=name, extra_args=[*ARGS, *extra_args],
                                           env=env))
    except BaseException:
        stop(nodes)
        raise
    return nodes


def stop(nodes: list[NodeProcess]) -> None:
    for node in nodes:
        node.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as started:
        yield started


@pytest.fixture(scope="module")
def mesh(etcd: EtcdProcess, repo: Path, receiver: OtlpReceiver) -> Iterator[list[NodeProcess]]:
    """Two traced nodes; the last test using it kills a holder."""
    nodes = start_pair(etcd, repo, ["--otlp-endpoint", receiver.endpoint], env=FAST_EXPORT)
    yield nodes
    stop(nodes)


@pytest.fixture(params=["mesh secret", "peer mutual TLS"])
def secured(etcd: EtcdProcess, repo: Path, tmp_path: Path,
            request: pytest.FixtureRequest) -> Iterator[list[NodeProcess]]:
    """Two untraced nodes whose peers prove membership: by the mesh secret's proof, or by their certificate."""
    if request.param == "mesh secret":
        secret = tmp_path / "secret"
        secret.write_text("a-mesh-secret-of-enough-bytes\n")
        args = ["--mesh-secret-file", str(secret)]
    else:
        certs = MeshCerts.generate(tmp_path / "certs")
        args = ["--peer-cert", str(certs.peer.cert), "--peer-key", str(certs.peer.key), "--peer-ca", str(certs.mesh_ca)]
    nodes = start_pair(etcd, repo, args)
    yield nodes
    stop(nodes)


def inputs(x: np.ndarray) -> list[grpcclient.InferInput]:
    return [grpcclient.InferInput("INPUT0", list(x.shape), "FP32").set_data_from_numpy(x)]


def holder(nodes: list[NodeProcess], model: str, timeout_s: float = 30.0) -> tuple[NodeProcess, NodeProcess]:
    """The node holding the model's one copy and the other node, once every node's view says so (a node
    whose view lists no copy yet would place a load, maybe on itself, at its next request)."""
    found: list[int] = []

    def one_copy() -> bool:
        reasons = set()
        for node in nodes:
            with grpcclient.InferenceServerClient(node.target) as client:
                reasons |= {m.reason for m in client.get_model_repository_index().models if m.name == model}
        found[:] = [i for i, n in enumerate(nodes) if reasons == {f"copies: {n.instance_id} (loaded)"}]
        return len(found) == 1

    wait_until_blocking(one_copy, timeout_s, f"one loaded copy of {model} in every node's view")
    return nodes[found[0]], nodes[1 - found[0]]


def place(nodes: list[NodeProcess], model: str, x: np.ndarray) -> tuple[NodeProcess, NodeProcess]:
    """One request loads the model somewhere: (its holder, the other node)."""
    with grpcclient.InferenceServerClient(nodes[0].target) as client:
        client.infer(model, inputs(x), client_timeout=60)
    return holder(nodes, model)


@dataclass
class Answers:
    """What a client sent and got: (input, output) pairs, and its failures."""

    ok: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def check(self, repo: Path) -> None:
        for x, out in self.ok:
            np.testing.assert_allclose(out, mlp_reference(repo / MLP, x), rtol=1e-4, atol=1e-5)


def ask(client: grpcclient.InferenceServerClient, rng: np.random.Generator, answers: Answers,
        client_timeout: float | None = None) -> None:
    """One request of 1-4 random rows; its answer or failure goes in `answers`."""
    x = rng.standard_normal((int(rng.integers(1, 5)), 16), dtype=np.float32)
    try:
        answers.ok.append((x, client.infer(MLP, inputs(x), client_timeout=client_timeout).as_numpy("OUTPUT0")))
    except InferenceServerException as error:
        answers.errors.append(str(error))


def send(target: str, total: int, workers: int) -> Answers:
    """`total` requests: half one after another, half from `workers` threads with a client each."""
    answers = Answers()

    def run(seed: int, requests: int) -> None:
        rng = np.random.default_rng(seed)
        with grpcclient.InferenceServerClient(target) as client:
            for _ in range(requests):
                ask(client, rng, answers)

    run(0, total // 2)
    concurrent = total - total // 2
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(run, w + 1, concurrent // workers + (w < concurrent % workers))
                       for w in range(workers)]:
            future.result()
    return answers


def api_total(node: NodeProcess) -> float:
    return metric(node, "modelmesh_api_request_total")


def count(samples: Samples, name: str, **labels: str) -> float:
    """The sample of `name` whose labels include `labels` (le aside); 0 before the node had one."""
    matching = [v for found, v in samples.get(name, []) if labels.items() <= found.items() and "le" not in found]
    assert len(matching) <= 1, f"{name}{labels}: {matching}"
    return sum(matching)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return count(after, name, **labels) - count(before, name, **labels)


def forwards_are_served_and_counted(nodes: list[NodeProcess], repo: Path, requests: int, workers: int) -> None:
    """Places the MLP, sends `requests` requests through the node without its copy, checks answers and counts."""
    copy, forwarder = place(nodes, MLP, np.ones((1, 16), np.float32))
    before = scrape(forwarder), scrape(copy)
    sent_before = api_total(forwarder)

    answers = send(forwarder.target, requests, workers)

    assert answers.errors == []
    assert len(answers.ok) == requests
    answers.check(repo)
    # The forwarder's bookkeeping is drained on its loop within 0.2 s of each forward.
    wait_until_blocking(lambda: api_total(forwarder) >= sent_before + requests, 5,
                        f"{forwarder.instance_id} to count {requests} forwarded requests")
    after = scrape(forwarder), scrape(copy)
    for node, was, now in ((forwarder, before[0], after[0]), (copy, before[1], after[1])):
        for name in ("modelmesh_api_request_milliseconds_count", "modelmesh_request_size_bytes_count",
                     "modelmesh_response_size_bytes_count"):
            assert delta(now, was, name, **OK) == requests, (node.instance_id, name)
    assert delta(after[1], before[1], "modelmesh_invoke_model_milliseconds_count", **OK) == requests
    assert "modelmesh_invoke_model_milliseconds_count" not in after[0]  # the forwarder ran nothing
    # Still the one copy: the forwarder never loaded, the holder loaded once and honoured every hop.
    assert metric(forwarder, "modelmesh_loadmodel_total") == 0
    assert metric(copy, "modelmesh_loadmodel_total") == 1
    assert metric(forwarder, "modelmesh_instance_models_total") == 0
    assert metric(copy, "meshserve_hops_stripped_total") == 0
    holder(nodes, MLP)


def test_forwards_under_the_mesh_proof_or_peer_tls_are_honoured(secured: list[NodeProcess], repo: Path) -> None:
    forwards_are_served_and_counted(secured, repo, requests=40, workers=4)


def test_many_forwards_are_answered_right_and_counted_on_both_nodes(mesh: list[NodeProcess], repo: Path) -> None:
    forwards_are_served_and_counted(mesh, repo, requests=200, workers=8)


def test_a_forward_is_one_trace_with_the_holders_span(mesh: list[NodeProcess], receiver: OtlpReceiver) -> None:
    copy, forwarder = holder(mesh, MLP)
    trace_id, client_span, traceparent = new_trace()
    with grpcclient.InferenceServerClient(forwarder.target) as client:
        client.infer(MLP, inputs(np.ones((1, 16), np.float32)), headers={"traceparent": traceparent})

    spans = received(receiver, trace_id, {forwarder.instance_id, copy.instance_id})

    entry = one(spans, forwarder.instance_id, INFER, SERVER)
    assert entry.parent_id == client_span
    assert entry.attributes.items() >= {"meshserve.model": MLP, "meshserve.outcome": "routed",
                                        "rpc.grpc.status_code": 0}.items()
    route = one(spans, forwarder.instance_id, "meshserve.route")
    assert route.parent_id == entry.span_id
    assert route.attributes.items() >= {"meshserve.route.chosen": copy.instance_id,
                                        "meshserve.route.reason": "copy"}.items()
    forward = one(spans, forwarder.instance_id, INFER, CLIENT)
    assert forward.parent_id == entry.span_id
    assert forward.attributes["rpc.grpc.status_code"] == 0
    served = one(spans, copy.instance_id, INFER, SERVER)
    assert served.parent_id == forward.span_id
    assert served.attributes.items() >= {"meshserve.hops": 1, "meshserve.mode": "copy"}.items()
    assert all(s.status_code != 2 for s in spans)


def test_a_forward_ends_at_the_clients_deadline(mesh: list[NodeProcess]) -> None:
    x = np.linspace(-1, 1, SLOW_WIDTH, dtype=np.float32).reshape(1, SLOW_WIDTH)
    copy, forwarder = place(mesh, SLOW, x)
    with grpcclient.InferenceServerClient(copy.target) as client:
        started = time.monotonic()
        client.infer(SLOW, inputs(x), client_timeout=60)
        run_s = time.monotonic() - started
    assert run_s > DEADLINE_S * 3, f"the slow model ran in {run_s:.3f} s: too fast to test a deadline"
    before = scrape(forwarder)

    with grpcclient.InferenceServerClient(forwarder.target) as client:
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as exceeded:
            client.infer(SLOW, inputs(x), client_timeout=DEADLINE_S)
        waited_s = time.monotonic() - started

    assert exceeded.value.status() == str(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert waited_s < DEADLINE_S + 1
    # The forward itself gave up at the deadline, not when the holder's run ended.
    wait_until_blocking(lambda: delta(scrape(forwarder), before, "modelmesh_api_request_milliseconds_count",
                                      **EXCEEDED) > 0, 5, "the forwarder to count the request out of time")
    after = scrape(forwarder)
    assert delta(after, before, "modelmesh_api_request_milliseconds_count", **EXCEEDED) == 1
    spent_ms = delta(after, before, "modelmesh_api_request_milliseconds_sum", **EXCEEDED)
    assert spent_ms < (DEADLINE_S + (run_s - DEADLINE_S) / 2) * 1000, (spent_ms, run_s)
    assert metric(forwarder, "modelmesh_loadmodel_total") == count(before, "modelmesh_loadmodel_total")
    holder(mesh, SLOW)  # nothing loaded another copy meanwhile


def test_a_holder_killed_under_load_loses_no_request(mesh: list[NodeProcess], repo: Path) -> None:
    copy, forwarder = holder(mesh, MLP)
    stopping = threading.Event()
    answers = Answers()

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpcclient.InferenceServerClient(forwarder.target) as client:
            while not stopping.is_set():
                ask(client, rng, answers, client_timeout=20)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(worker, 100 + w) for w in range(4)]
        try:
            wait_until_blocking(lambda: len(answers.ok) >= 40, 20, "40 forwarded answers before the kill")
            copy.kill()
            at_kill = len(answers.ok)
            # An error ends the wait: it fails the test below, with what it was.
            wait_until_blocking(lambda: len(answers.ok) >= at_kill + 100 or bool(answers.errors), 30,
                                "100 answers after the holder died")
        finally:
            stopping.set()
        for future in futures:
            future.result()

    assert answers.errors == []
    answers.check(repo)
    # The forwarder's router loaded the model on the one node left.
    assert metric(forwarder, "modelmesh_loadmodel_total") >= 1
    with grpcclient.InferenceServerClient(forwarder.target) as client:
        x = np.ones((1, 16), np.float32)
        out = client.infer(MLP, inputs(x), client_timeout=10).as_numpy("OUTPUT0")
    np.testing.assert_allclose(out, mlp_reference(repo / MLP, x), rtol=1e-4, atol=1e-5)
