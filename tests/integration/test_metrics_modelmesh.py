"""ModelMesh's metrics on a real node's /metrics, read with Prometheus' own text parser after known traffic;
and the Grafana dashboard asks only for metrics a node exports.

Two nodes: n1 is too small for the model, so every load is on n0 and n1 forwards its requests there.
"""

from __future__ import annotations

import json
import queue
import re
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from deploy.local.models import write_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "meshserve.json"
TO_N0, TO_N1 = 5, 2  # requests for the model sent to each node
OK = {"method": "ModelInfer", "code": "OK"}
STREAMED_OK = {"method": "ModelStreamInfer", "code": "OK"}

Samples = dict[str, list[tuple[dict[str, str], float]]]


@pytest.fixture(scope="module")
def mesh(etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    repo = tmp_path_factory.mktemp("metrics-repo")
    write_mlp(repo, "mlp", approx_bytes=200_000)
    prefix = f"metrics-{uuid.uuid4().hex[:8]}"
    nodes: list[NodeProcess] = []
    try:
        for name, capacity, extra in (("n0", "64MiB", ["--per-model-metrics", "1"]), ("n1", "50kB", [])):
            nodes.append(NodeProcess.start(etcd=etcd.endpoint, model_repository=repo, capacity=capacity,
                                           etcd_prefix=prefix, instance_id=name,
                                           extra_args=["--no-proactive-loads", *extra]))
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def infer(target: str, model: str = "mlp") -> None:
    x = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32))
    with grpcclient.InferenceServerClient(target) as client:
        client.infer(model, [x])


def stream_infer(target: str) -> None:
    """One request on a ModelStreamInfer stream, then the stream's end once it is answered."""
    x = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32))
    answers: queue.Queue[object] = queue.Queue()
    with grpcclient.InferenceServerClient(target) as client:
        client.start_stream(lambda result, error: answers.put(error or result))
        client.async_stream_infer("mlp", [x])
        assert not isinstance(answers.get(timeout=30), InferenceServerException)
        client.stop_stream()


def scrape(node: NodeProcess) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10).read().decode()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels` (le aside)."""
    matching = [v for found, v in samples.get(name, []) if labels.items() <= found.items() and "le" not in found]
    assert len(matching) == 1, f"{name}{labels}: {samples.get(name)}"
    return matching[0]


@pytest.fixture(scope="module")
def traffic(mesh: list[NodeProcess]) -> tuple[Samples, Samples]:
    n0, n1 = mesh
    for _ in range(TO_N0):
        infer(n0.target)
    for _ in range(TO_N1):
        infer(n1.target)
    with pytest.raises(InferenceServerException) as refused:
        infer(n0.target, "nope")
    assert refused.value.status() == str(grpc.StatusCode.NOT_FOUND)
    stream_infer(n1.target)  # forwarded to n0 on a stream
    return scrape(n0), scrape(n1)


def test_api_and_invoke_metrics_have_modelmesh_labels_and_count_every_request(
        traffic: tuple[Samples, Samples]) -> None:
    n0, n1 = traffic
    served = TO_N0 + TO_N1  # n1's requests were forwarded to n0's copy
    # n0 has per-model labels on, but no scrape had chosen the busiest models yet: every model is under "".
    for name in ("modelmesh_api_request_milliseconds_count", "modelmesh_request_size_bytes_count",
                 "modelmesh_response_size_bytes_count"):
        assert value(n0, name, **OK, modelId="") == served, name
    # The streamed request ran on n0's copy as one invocation of the model, as a unary one does.
    assert value(n0, "modelmesh_invoke_model_milliseconds_count", **OK, modelId="") == served + 1
    assert value(n0, "modelmesh_api_request_milliseconds_count", method="ModelInfer", code="NOT_FOUND") == 1
    assert value(n0, "modelmesh_request_size_bytes_count", method="ModelInfer", code="NOT_FOUND") == 1
    assert not [s for s in n0["modelmesh_response_size_bytes_count"] if s[0]["code"] == "NOT_FOUND"]
    request_bytes = value(n0, "modelmesh_request_size_bytes_sum", **OK, modelId="") / served
    assert 64 < request_bytes < 1024  # 16 floats and the request's names
    assert value(n1, "modelmesh_api_request_milliseconds_count", **OK) == TO_N1
    assert "modelmesh_invoke_model_milliseconds_count" not in n1  # n1 ran nothing
    assert value(n0, "modelmesh_api_request_milliseconds_count", **STREAMED_OK, modelId="") == 1
    assert value(n1, "modelmesh_api_request_milliseconds_count", **STREAMED_OK) == 1
    assert value(n1, "modelmesh_request_size_bytes_count", **STREAMED_OK) == 1
    assert value(n0, "modelmesh_api_request_total") == served + 1 + 1  # the refused request, the streamed one


def test_load_queue_sizing_and_unload_metrics(traffic: tuple[Samples, Samples]) -> None:
    n0, n1 = traffic
    assert value(n0, "modelmesh_loadmodel_total") == 1
    assert value(n0, "modelmesh_loading_queue_delay_milliseconds_count") == 1
    assert value(n0, "modelmesh_loaded_model_size_bytes_count") == 1
    assert value(n0, "modelmesh_loaded_model_size_bytes_sum") > 100_000
    assert value(n0, "modelmesh_model_sizing_milliseconds_count") >= 1
    assert value(n0, "modelmesh_req_queue_delay_milliseconds_count") == TO_N0 + TO_N1 + 1  # and the streamed one
    assert value(n0, "modelmesh_unloadmodel_attempt_failure_total") == 0
    assert value(n1, "modelmesh_loading_queue_delay_milliseconds_count") == 0


def test_mesh_wide_gauges_come_from_one_node(traffic: tuple[Samples, Samples]) -> None:
    n0, n1 = traffic
    assert value(n0, "modelmesh_models_managed_total") == 1  # n0: the lowest live instance id
    assert value(n0, "modelmesh_models_loaded_total") == 1
    assert value(n0, "modelmesh_models_with_failure_total") == 0
    for name in ("modelmesh_models_managed_total", "modelmesh_models_loaded_total",
                 "modelmesh_models_with_failure_total"):
        assert name not in n1
    assert value(n1, "modelmesh_instance_models_total") == 0  # per node, on every node


def test_per_model_labels_name_only_the_busiest_model(mesh: list[NodeProcess],
                                                      traffic: tuple[Samples, Samples]) -> None:
    n0 = mesh[0]
    for _ in range(3):  # after the scrape that chose "mlp" as the busiest model
        infer(n0.target)

    samples = scrape(n0)

    assert value(samples, "modelmesh_api_request_milliseconds_count", **OK, modelId="mlp") == 3
    assert value(samples, "modelmesh_invoke_model_milliseconds_count", **OK, modelId="mlp") == 3
    assert {labels["modelId"] for labels, _ in samples["modelmesh_api_request_milliseconds_count"]} == {"mlp", ""}


def test_every_dashboard_query_names_metrics_a_node_exports(traffic: tuple[Samples, Samples]) -> None:
    exported = set(traffic[0]) | set(traffic[1])
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries.append(dashboard["templating"]["list"][1]["query"]["query"])
    titles = {panel["title"] for panel in dashboard["panels"]}

    assert len(queries) > 20
    for query in queries:
        names = set(re.findall(r"\b(?:modelmesh|meshserve)_\w+", query))
        assert names, query
        assert names <= exported, f"{query}: {sorted(names - exported)} not exported"
    assert {"Request rate by status code", "Request latency (external)", "Cache hit ratio", "Loads and load failures",
            "Queue delays (p95)", "Memory used per node", "Evictions"} <= titles
