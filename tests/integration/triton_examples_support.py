"""What tests/integration/test_triton_examples.py shares: the two meshes its examples run against, Triton's
example models for a Triton node, and the checks Triton's example clients make of the add/sub answers.

Both meshes have three nodes: n0 holds every model (loaded through it), n1 and n2 have no room for one and forward.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from deploy.local.models import write_identity, write_simple, write_simple_sequence, write_simple_string
from deploy.local.triton_models import as_python_backend, write_python_repeat
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from meshnode.local.triton import TritonProcess
from tests.integration.conftest import start_node
from tests.integration.helpers import wait_until_blocking

WAIT_S = 30.0
HOLDER, FORWARDER = "n0", "n1"
THROUGH = ("holder", "forwarder")



def write_onnx_examples(repo: Path) -> Path:
    """The ONNX Runtime mesh's repository: Triton's simple, simple_int8, simple_string, simple_identity and
    simple_sequence (idle sequences kept a minute, longer than any test here takes)."""
    write_simple(repo)
    write_simple(repo, "simple_int8", "INT8")
    write_simple_string(repo)
    write_identity(repo, "simple_identity", "BYTES")
    write_simple_sequence(repo, idle_us=60_000_000)
    return repo


def write_triton_examples(repo: Path) -> Path:
    """The Triton mesh's repository: simple and simple_sequence in the Python backend, and repeat_int32."""
    as_python_backend(write_simple(repo))
    as_python_backend(write_simple_sequence(repo, idle_us=60_000_000))
    write_python_repeat(repo)
    return repo


@dataclass
class Mesh:
    runtime: str
    nodes: dict[str, NodeProcess]
    models: tuple[str, ...]  # every model of its repository, each with a copy on n0 only
    tritons: list[TritonProcess] = field(default_factory=list)  # n0's first, when the runtime is Triton

    def target(self, through: str) -> str:
        """The node a client calls: "holder" (n0) or "forwarder" (n1)."""
        return self.nodes[HOLDER if through == "holder" else FORWARDER].target


@contextmanager
def running_mesh(etcd: EtcdProcess, repo: Path, triton: Callable[[Path], TritonProcess] | None) -> Iterator[Mesh]:
    """Three nodes on `repo`, each with a Triton of its own when `triton` starts them, every model of `repo`
    loaded on n0 and seen ready by the others; the nodes stop on leaving."""
    prefix = f"examples-{uuid.uuid4().hex[:8]}"
    mesh = Mesh("triton" if triton else "onnx", {}, tuple(sorted(p.name for p in repo.iterdir())))
    try:
        for name, capacity in ((HOLDER, "1GiB"), (FORWARDER, "1KiB"), ("n2", "1KiB")):
            extra = ["--instance-id", name, "--no-proactive-loads"]
            if triton is not None:
                mesh.tritons.append(triton(repo))
                extra += ["--runtime", "triton", "--triton-url", mesh.tritons[-1].grpc_target,
                          "--triton-model-repository", str(repo)]
            mesh.nodes[name] = start_node(etcd, repo, capacity=capacity, prefix=prefix, extra_args=extra)
        with grpcclient.InferenceServerClient(mesh.nodes[HOLDER].target) as client:
            for model in mesh.models:
                client.load_model(model)
        for name in (FORWARDER, "n2"):
            with grpcclient.InferenceServerClient(mesh.nodes[name].target) as client:
                wait_until_blocking(lambda: all(client.is_model_ready(m) for m in mesh.models), WAIT_S,
                                    f"{name} to see n0's copies")
        yield mesh
    finally:
        for node in mesh.nodes.values():
            node.stop()


def simple_inputs(module: ModuleType) -> tuple[list[grpcclient.InferInput], np.ndarray, np.ndarray]:
    """The examples' request to "simple": INPUT0 = 0..15, INPUT1 = ones, INT32 [1, 16]; of tritonclient.grpc or .aio."""
    input0 = np.expand_dims(np.arange(16, dtype=np.int32), axis=0)
    input1 = np.ones((1, 16), np.int32)
    inputs = [module.InferInput("INPUT0", [1, 16], "INT32"), module.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(input0)
    inputs[1].set_data_from_numpy(input1)
    return inputs, input0, input1


def simple_outputs(module: ModuleType) -> list[grpcclient.InferRequestedOutput]:
    return [module.InferRequestedOutput("OUTPUT0"), module.InferRequestedOutput("OUTPUT1")]


def check_sum_and_difference(input0: np.ndarray, input1: np.ndarray, result: grpcclient.InferResult) -> None:
    """The examples' check: OUTPUT0 is the element-wise sum, OUTPUT1 the difference, for all 16 elements."""
    output0, output1 = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    assert output0 is not None and output1 is not None
    for i in range(16):
        assert input0[0][i] + input1[0][i] == output0[0][i], "incorrect sum"
        assert input0[0][i] - input1[0][i] == output1[0][i], "incorrect difference"


# The sequence examples' traffic: three sequences (two integer ids, one string) of these values, and what
# Triton's simple_sequence answers to each request: its first input plus one, then each input.
SEQUENCE_VALUES = [11, 7, 5, 3, 2, 0, 1]
SEQUENCE_FIRSTS = (0, 100, 20)


def sequence_ids() -> tuple[int | str, ...]:
    return 1000, 1001, str(uuid.uuid4())


def sequence_values(first: int) -> list[int]:
    """A sequence's inputs: the first, then SEQUENCE_VALUES (negated after a non-zero first, as the examples)."""
    return [first] + [value if first == 0 else -value for value in SEQUENCE_VALUES]


def expected_sequence_outputs(first: int) -> list[int]:
    values = sequence_values(first)
    return [values[0] + 1, *values[1:]]


def sequence_requests(module: ModuleType, ids: tuple[int | str, ...]) -> Iterator[dict[str, Any]]:
    """The sequence examples' requests in their order, as keyword arguments of tritonclient's infer calls (of
    tritonclient.grpc or .aio): each sequence whole, INPUT INT32 [1, 1], request ids "<sequence id>_<count>"."""
    for sequence_id, first in zip(ids, SEQUENCE_FIRSTS, strict=True):
        values = sequence_values(first)
        for count, value in enumerate(values, 1):
            data = np.full([1, 1], value, np.int32)
            tensor = module.InferInput("INPUT", list(data.shape), "INT32")
            tensor.set_data_from_numpy(data)
            yield {"model_name": "simple_sequence", "inputs": [tensor],
                   "outputs": [module.InferRequestedOutput("OUTPUT")], "request_id": f"{sequence_id}_{count}",
                   "sequence_id": sequence_id, "sequence_start": count == 1, "sequence_end": count == len(values)}


def infer_simple(client: grpcclient.InferenceServerClient) -> None:
    inputs, input0, input1 = simple_inputs(grpcclient)
    results = client.infer(model_name="simple", inputs=inputs, outputs=simple_outputs(grpcclient),
                           headers={"test": "1"})
    check_sum_and_difference(input0, input1, results)


def explicit_request(model: str, datatype: str, fill: Callable[[Any, int], None]) -> Any:
    """The explicit-content examples' request: INPUT0, INPUT1 [1, 16] filled by `fill(tensor, index)`."""
    request = service_pb2.ModelInferRequest(model_name=model, model_version="")
    for index, name in enumerate(("INPUT0", "INPUT1")):
        tensor = service_pb2.ModelInferRequest().InferInputTensor(name=name, datatype=datatype, shape=[1, 16])
        fill(tensor, index)
        request.inputs.append(tensor)
    request.outputs.extend([service_pb2.ModelInferRequest().InferRequestedOutputTensor(name=n)
                            for n in ("OUTPUT0", "OUTPUT1")])
    return request


def raw_outputs(response: Any, decode: Callable[[bytes], np.ndarray]) -> list[np.ndarray]:
    results = [np.resize(decode(raw), list(output.shape))
               for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)]
    assert len(results) == 2, "expected two output results"
    return results


def check_int_contents(results: list[np.ndarray]) -> None:
    for i in range(16):
        assert i + 1 == results[0][0][i], "incorrect sum"
        assert i - 1 == results[1][0][i], "incorrect difference"


def ints(tensor: Any, index: int) -> None:
    tensor.contents.int_contents[:] = list(range(16)) if index == 0 else [1] * 16


def check_sequences(ids: tuple[int | str, ...], answers: dict[int | str, list[int]]) -> None:
    """The sequence examples' check: each sequence's answers, by the id its requests carried."""
    assert answers == {i: expected_sequence_outputs(first) for i, first in zip(ids, SEQUENCE_FIRSTS, strict=True)}


def by_request_id(ids: tuple[int | str, ...], answers: list[Any]) -> dict[int | str, list[int]]:
    """The stream examples sort answers by the sequence id in their request id ("<sequence id>_<count>")."""
    sorted_answers: dict[int | str, list[int]] = {}
    for answer in answers:
        assert not isinstance(answer, InferenceServerException), answer
        this_id = answer.get_response().id.split("_")[0]
        key = next(i for i in ids if str(i) == this_id)
        sorted_answers.setdefault(key, []).append(int(answer.as_numpy("OUTPUT")[0][0]))
    return sorted_answers
