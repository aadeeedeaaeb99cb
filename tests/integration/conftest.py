"""Node fixtures: a real etcd (tests/conftest.py), example models on disk, node processes."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from deploy.local.models import write_add_sub, write_identity, write_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from meshnode.local.triton import TritonProcess

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES")


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    write_mlp(root, "mlp", approx_bytes=200_000)
    write_mlp(root, "mlp", version=2, approx_bytes=200_000, seed=1)
    # Both versions served, as Triton would with this config (its default serves only the latest).
    (root / "mlp" / "config.pbtxt").write_text('name: "mlp"\nplatform: "onnxruntime_onnx"\n'
                                                'version_policy: { all { } }\n')
    for version in (1, 2, 3):
        write_add_sub(root, "picked", version, width=version)
    (root / "picked" / "config.pbtxt").write_text("version_policy: { specific { versions: [1, 3] } }\n")
    write_add_sub(root, "simple")
    for datatype in DATATYPES:
        write_identity(root, f"id_{datatype.lower()}", datatype)
    write_broken(root)
    return root


def write_broken(root: Path, name: str = "broken") -> None:
    """A model whose file is not a model: its loads fail."""
    version = root / name / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"this is not an onnx model")


def start_nodes(etcd: EtcdProcess, repo: Path, count: int, capacity: str = "256MiB",
                extra_args: list[str] | None = None) -> list[NodeProcess]:
    """`count` nodes of one mesh (one etcd prefix), named n0, n1, ..."""
    prefix = f"mesh-{uuid.uuid4().hex[:8]}"
    return [start_node(etcd, repo, capacity, prefix, [*(extra_args or []), "--instance-id", f"n{i}"])
            for i in range(count)]


def start_node(etcd: EtcdProcess, repo: Path, capacity: str = "256MiB", prefix: str | None = None,
               extra_args: list[str] | None = None) -> NodeProcess:
    return NodeProcess.start(etcd=etcd.endpoint, model_repository=repo, capacity=capacity,
                             etcd_prefix=prefix or f"t-{uuid.uuid4().hex[:8]}", extra_args=extra_args)


# Both kinds of gRPC server the node's ports can be (--grpc-server): the protocol is the same on either.
GRPC_SERVERS = ("aio", "threaded")


@pytest.fixture(scope="module", params=GRPC_SERVERS)
def node(etcd: EtcdProcess, model_repo: Path, request: pytest.FixtureRequest) -> Iterator[NodeProcess]:
    process = start_node(etcd, model_repo, extra_args=["--grpc-server", request.param])
    yield process
    process.stop()


@pytest.fixture
def client(node: NodeProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(node.target) as c:
        yield c


@pytest.fixture(scope="module")
def tritons() -> Iterator[Callable[[Path], TritonProcess]]:
    """Starts Triton servers (`make triton` installs them) on a repository each; all stop at the module's end.

    Never skipped: a Triton that cannot start fails the test with its log.
    """
    started: list[TritonProcess] = []

    def start(repository: Path) -> TritonProcess:
        started.append(TritonProcess.start(repository))
        return started[-1]

    yield start
    for server in started:
        server.stop()
