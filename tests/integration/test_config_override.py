"""RepositoryModelLoad's `config` as Triton reads it (its simple_grpc_model_control.py example): the ModelConfig
fields in it replace the model's config.pbtxt on every node, in both runtimes, until a load without them; a
config that is no JSON object is refused in Triton's words."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from deploy.local.models import write_add_sub
from deploy.local.triton_models import write_python_add_sub
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from tests.integration.conftest import start_nodes
from tests.integration.helpers import wait_until_blocking
from tests.integration.test_triton_runtime import Start, add_inputs, start_triton_node

pytestmark = pytest.mark.timeout(120)

WIDTH = 16
# Triton's "simple" spells out its tensors and a batch bound of 8.
SIMPLE_CONFIG = (
    'name: "simple"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
    + "".join(f'{kind} [ {{ name: "{kind.upper()}0" data_type: TYPE_FP32 dims: [ {WIDTH} ] }}, '
              f'{{ name: "{kind.upper()}1" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]\n'
              for kind in ("input", "output"))
)
# Triton's example sends this fragment, which is no JSON object, and expects "failed to load".
FRAGMENT = '"parameters": {"config": {{"max_batch_size": "16"}}}'


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("override-repo")
    write_add_sub(root, "simple", width=WIDTH)
    (root / "simple" / "config.pbtxt").write_text(SIMPLE_CONFIG)
    for version in (1, 2):  # Triton's default policy serves only version 2
        write_add_sub(root, "versioned", version, width=version)
    return root


@pytest.fixture(scope="module")
def nodes(etcd: EtcdProcess, repo: Path) -> Iterator[list[NodeProcess]]:
    started = start_nodes(etcd, repo, 2, extra_args=["--no-proactive-loads"])
    yield started
    for node in started:
        node.stop()


def max_batch_size(node: NodeProcess, model: str) -> int:
    with grpcclient.InferenceServerClient(node.target) as client:
        return int(client.get_model_config(model, client_timeout=30).config.max_batch_size)


def refusal(node: NodeProcess, model: str, config: str) -> InferenceServerException:
    with grpcclient.InferenceServerClient(node.target) as client, pytest.raises(InferenceServerException) as caught:
        client.load_model(model, config=config)
    return caught.value


def test_a_config_that_is_no_json_object_or_names_an_unknown_field_is_refused_in_tritons_words(
        nodes: list[NodeProcess]) -> None:
    fragment = refusal(nodes[0], "simple", FRAGMENT)
    assert fragment.status() == "StatusCode.INVALID_ARGUMENT"
    assert (fragment.message() or "").startswith("failed to load 'simple': the 'config' parameter is not valid "
                                                 "JSON: Extra data"), fragment.message()
    unknown = refusal(nodes[1], "simple", '{"max_batch_size": 16, "colour": "red"}')
    assert unknown.status() == "StatusCode.INVALID_ARGUMENT"
    assert (unknown.message() or "").startswith("failed to load 'simple': the 'config' parameter has unknown field "
                                                "'colour'"), unknown.message()


def test_an_override_is_the_models_config_through_every_node_until_a_load_without_it(
        nodes: list[NodeProcess]) -> None:
    a, b = nodes
    with grpcclient.InferenceServerClient(a.target) as client:
        client.load_model("simple")
        assert max_batch_size(b, "simple") == 8  # b has no copy: a's answers
        client.load_model("simple", config='{"max_batch_size":"16"}')
        assert max_batch_size(a, "simple") == 16
        with grpcclient.InferenceServerClient(b.target) as other:
            config = other.get_model_config("simple", client_timeout=30).config
        # The override replaces the file whole: the graph fills in the tensors, as Triton's auto-complete does.
        assert config.max_batch_size == 16 and [list(t.dims) for t in config.input] == [[WIDTH], [WIDTH]]
    with grpcclient.InferenceServerClient(b.target) as client:
        client.load_model("simple", config=json.dumps({"pinned": False}))  # meshserve's keys only: the file's again
    wait_until_blocking(lambda: max_batch_size(a, "simple") == 8, 10, "node a reading config.pbtxt again")
    assert max_batch_size(b, "simple") == 8


def test_an_overrides_version_policy_decides_the_versions_served(nodes: list[NodeProcess]) -> None:
    a, b = nodes
    first = grpcclient.InferInput("INPUT0", [1, 1], "FP32"), grpcclient.InferInput("INPUT1", [1, 1], "FP32")
    for tensor in first:
        tensor.set_data_from_numpy(np.ones((1, 1), np.float32))
    with grpcclient.InferenceServerClient(a.target) as through_a, \
            grpcclient.InferenceServerClient(b.target) as through_b:
        with pytest.raises(InferenceServerException, match="version 1 is not found"):
            through_b.infer("versioned", list(first), model_version="1", client_timeout=30)
        through_a.load_model("versioned", config='{"version_policy": {"all": {}}}')
        answer = through_b.infer("versioned", list(first), model_version="1", client_timeout=30).as_numpy("OUTPUT0")
        assert answer is not None and answer.tolist() == [[2.0]]
        # A load without it: copies made under the override are stale, and version 1 is not served any more.
        through_a.load_model("versioned")

        def version_one_refused() -> bool:
            try:
                through_b.infer("versioned", list(first), model_version="1", client_timeout=30)
            except InferenceServerException as error:
                return "version 1 is not found" in (error.message() or "")
            return False

        wait_until_blocking(version_one_refused, 10, "version 1 refused once the override is gone")


def test_an_override_reaches_triton_as_its_own_clients_send_it(etcd: EtcdProcess, tritons: Start,
                                                               tmp_path: Path) -> None:
    repo = tmp_path / "triton-repo"
    write_python_add_sub(repo, "add", width=WIDTH)  # max_batch_size 0, dims [-1, 16]
    triton = tritons(repo)
    node = start_triton_node(etcd, repo, triton)
    tensors = {kind: [{"name": f"{kind.upper()}{i}", "data_type": "TYPE_FP32", "dims": [WIDTH]} for i in (0, 1)]
               for kind in ("input", "output")}
    override = {"backend": "python", "max_batch_size": "16", **tensors}
    try:
        with grpcclient.InferenceServerClient(node.target) as client:
            client.load_model("add", config=json.dumps(override))
            assert client.get_model_config("add", client_timeout=30).config.max_batch_size == 16
            with grpcclient.InferenceServerClient(triton.grpc_target) as direct:
                assert direct.get_model_config("add").config.max_batch_size == 16  # Triton holds the override
            a = np.arange(2 * WIDTH, dtype=np.float32).reshape(2, WIDTH)
            result = client.infer("add", add_inputs(a, np.ones_like(a)), client_timeout=30)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + 1)
            client.load_model("add")  # without it: Triton gets the config.pbtxt again
            assert client.get_model_config("add", client_timeout=30).config.max_batch_size == 0
    finally:
        node.stop()
