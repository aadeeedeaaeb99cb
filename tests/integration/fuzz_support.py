"""What the fuzz modules share (test_fuzz_management.py, test_fuzz_repository.py): the node they fuzz, the storage it
may be pointed at, blocking calls on its services, the property's check, and the strategies of the requests.

Property: whatever the fields say (unicode, empty, very long, '/', '..', NUL; negative, huge or NaN numbers;
any JSON in `config`; any tensors), each call ends within its deadline with a status a client can act on
(CLIENT_STATUSES: never UNKNOWN, INTERNAL or DEADLINE_EXCEEDED), and the node is still live afterwards.

The one documented exception is the INTERNAL of a failed load whose cause is the model itself (LOAD_FAILED: a
broken file, a runtime's error), as Triton answers it; which requests meet it depends on the node's state, so the
property recognises it by its message, and explicit tests in test_fuzz_management.py pin each cause's exact status
and message. Inputs the fuzzing found and the node now refuses with a client's status are kept as explicit
examples there too, as plain tests of that status.

Fuzzing never points a model at a real directory: every storage_uri is under the module's tmp dir or resolves to
nothing (`safe_storage` filters the rest), and uploads go to the node's repository, itself a tmp dir.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st

from deploy.local.models import write_identity
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from meshnode.net import params as wire
from meshnode.runtimes.base import TensorSpec
from meshnode.storage.repository import resolve_storage_uri
from meshpb import INFERENCE_METHODS, INFERENCE_SERVICE, MANAGEMENT_METHODS, MANAGEMENT_SERVICE, mpb, pb
from router.hop import PARAMETER_KEY
from tests.integration.conftest import DATATYPES, start_node, write_broken
from tests.unit.meshnode.runtimes.tensor_strategies import infer_requests

CALL_DEADLINE_S = 10.0
Code = grpc.StatusCode
CLIENT_STATUSES = frozenset({Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS,
                             Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE, Code.ABORTED})
# meshnode.errors.Unsupported: what the protocol has and the node does not do (shared memory, classification).
INFER_STATUSES = CLIENT_STATUSES | {Code.UNIMPLEMENTED}

# The models of tests/integration/conftest.py's model_repo: served by ModelInfer, never touched by management
# fuzzing (which could unregister them, alias them, or overwrite their files with uploads).
INFER_MODELS: dict[str, tuple[list[TensorSpec], list[TensorSpec]]] = {
    "mlp": ([TensorSpec("INPUT0", "FP32", (-1, 16))], [TensorSpec("OUTPUT0", "FP32", (-1, 4))]),
    "simple": ([TensorSpec(n, "FP32", (-1, 16)) for n in ("INPUT0", "INPUT1")],
               [TensorSpec(n, "FP32", (-1, 16)) for n in ("OUTPUT0", "OUTPUT1")]),
    **{f"id_{d.lower()}": ([TensorSpec("INPUT0", d, (-1, 16))], [TensorSpec("OUTPUT0", d, (-1, 16))])
       for d in DATATYPES},
    "broken": ([TensorSpec("INPUT0", "FP32", (-1, 16))], [TensorSpec("OUTPUT0", "FP32", (-1, 16))]),
}
PROTECTED = frozenset(INFER_MODELS)

# derandomize: the same examples on every run (CI is reproducible); database=None: no example database.
# deadline=None: each call has its own gRPC deadline, which is the property's "never a hang".
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ---- the node and the storage it may be pointed at -------------------------------------------------------


@dataclass(frozen=True)
class Storage:
    root: Path
    loadable: list[str]  # model directories and files that load
    unloadable: list[str]  # exist, but do not load: an empty dir, a plain file, a broken model
    missing: str  # a directory that does not exist


def make_storage(tmp_path_factory: pytest.TempPathFactory) -> Storage:
    """The storage of a fuzz module's `storage` fixture."""
    root = tmp_path_factory.mktemp("fuzz-storage")
    tiny = write_identity(root, "tiny", "FP32", shape=(-1, 2))
    write_broken(root)
    (root / "empty").mkdir()
    (root / "plain.txt").write_text("not a model")
    (root / "noversion" / "1").mkdir(parents=True)
    return Storage(root, [str(tiny), str(tiny / "1" / "model.onnx")],
                   [str(root / n) for n in ("broken", "empty", "plain.txt", "noversion")], str(root / "missing"))


@contextmanager
def running_fuzz_node(etcd: EtcdProcess, model_repo: Path) -> Iterator[NodeProcess]:
    """The one node of a fuzz module (each starts its own); no proactive loads, so the node does only what the fuzzed
    calls ask."""
    process = start_node(etcd, model_repo, capacity="128MiB", extra_args=["--no-proactive-loads"])
    yield process
    process.stop()


class Rpc:
    """Blocking unary calls by method name on the node's two services (meshnode.net.transport's stubs are for
    grpc.aio; hypothesis drives plain functions)."""

    def __init__(self, node: NodeProcess, channel: grpc.Channel) -> None:
        self.node = node
        self._calls: dict[str, grpc.UnaryUnaryMultiCallable[Any, Any]] = {}
        for service, methods in ((INFERENCE_SERVICE, INFERENCE_METHODS), (MANAGEMENT_SERVICE, MANAGEMENT_METHODS)):
            for method, (request_cls, response_cls, client_streams, server_streams) in cast(
                    Mapping[str, tuple[type[Message], type[Message], bool, bool]], methods).items():
                if not (client_streams or server_streams):
                    self._calls[method] = channel.unary_unary(
                        f"/{service}/{method}", request_serializer=request_cls.SerializeToString,
                        response_deserializer=response_cls.FromString)

    def __call__(self, method: str, request: Any, timeout_s: float = CALL_DEADLINE_S) -> Any:
        return self._calls[method](request, timeout=timeout_s)

    def status(self, method: str, request: Any) -> tuple[grpc.StatusCode, str]:
        """How the call ended: OK, or the status and details of its error."""
        try:
            self(method, request)
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
        return Code.OK, ""

    def assert_live(self, after: str) -> None:
        assert self.node.process.poll() is None, f"the node exited after {after}:\n{self.node.log()[-3000:]}"
        assert self("ServerLive", pb.ServerLiveRequest(), timeout_s=5).live, f"not live after {after}"


@contextmanager
def rpc_on(node: NodeProcess) -> Iterator[Rpc]:
    with grpc.insecure_channel(node.target) as channel:
        yield Rpc(node, channel)


def describe(request: Any) -> str:
    text = repr(request)  # protobuf's text format: NUL and other control characters show as escapes
    return f"{type(request).__name__}({text[:600]}{'...' if len(text) > 600 else ''})"


def check(rpc: Rpc, method: str, request: Any, allowed: frozenset[grpc.StatusCode] = CLIENT_STATUSES) -> None:
    """One call: its status is a client's, it came within the deadline, and the node is live after it."""
    code, details = rpc.status(method, request)
    event(f"{method} -> {code.name}")
    if code not in allowed and not documented_load_failure(code, details):
        pytest.fail(f"{method} {describe(request)} ended {code.name}: {details[:500]!r}")
    rpc.assert_live(method)


# A load that fails answers INTERNAL (meshnode.errors.LoadFailed, as Triton answers a failed load) when its cause is
# the model itself: a broken file, a runtime's error. A cause with a status a client can act on keeps it
# (LoadFailed.because): no versions or an unknown model is NOT_FOUND, too big for any node RESOURCE_EXHAUSTED, a load
# that timed out UNAVAILABLE. The tests test_load_failure_* in test_fuzz_management.py pin each cause; the fuzzing
# recognises the INTERNAL ones by their messages (which one depends on the node's state, not only on the request).
LOAD_FAILED = re.compile(r"^(load failed for model '|no copy of model '|alias '.*' (not set|stays on '.*'): )",
                         re.DOTALL)


def documented_load_failure(code: grpc.StatusCode, details: str) -> bool:
    return code == Code.INTERNAL and LOAD_FAILED.match(details) is not None


# ---- strategies ---------------------------------------------------------------------------------------------

FUZZ_NAMES = ["fz-a", "fz-b", "fz-c"]  # few, so that calls meet: register then alias, alias then unregister
SPECIAL = ["", " ", ".", "..", "/", "a/b", "../x", "./", "\x00", "a\x00b", "-", "*", "%00", "%2F", "é", "\U0001f600",
           "\u202e", "a\nb", "\\", "x" * 253, "x" * 254, "meshserve_hop", "page-", "\ufeff"]
long_texts = st.builds(lambda piece, n: piece * n, st.sampled_from(["x", "é", "/", "\x00", "\U0001f600", "a."]),
                       st.sampled_from([255, 1000, 4096, 20_000]))
texts = st.one_of(st.sampled_from(SPECIAL), st.text(max_size=12), long_texts)
names = st.one_of(st.sampled_from(FUZZ_NAMES), texts).filter(lambda n: n not in PROTECTED)
uint32s = st.one_of(st.sampled_from([0, 1, 2, 100, 101, 1000, 1001, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
uint64s = st.one_of(st.sampled_from([0, 1, 2**31, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
int64s = st.one_of(st.sampled_from([-1, 0, 1, -(2**63), 2**63 - 1]), st.integers(-(2**63), 2**63 - 1))
floats = st.one_of(st.sampled_from([0.0, -0.0, -1.0, 1e-300, 0.5, 30.0, 1e300]), st.floats())
runtimes = st.one_of(st.none(), st.sampled_from(["onnxruntime", "triton", "any", "", "tpu", "ONNXRUNTIME"]), texts)


def storage_uris(storage: Storage) -> st.SearchStrategy[str]:
    existing = [*storage.loadable, *storage.unloadable]
    return st.one_of(
        st.sampled_from(existing),
        st.sampled_from(existing).map(lambda p: "file://" + p),
        st.text(max_size=12).map(lambda t: f"{storage.missing}/{t}"),
        st.sampled_from(["", "file://", "file:", "file:///", "://", "http://host/m", "s3://bucket/m", "gs://b/m",
                         f"file://{storage.missing}", f"{storage.missing}/a%00b", f"file://{storage.missing}/%ZZ"]),
        # what the file system refuses: NUL, an unknown user's home, a too long name
        st.sampled_from([f"{storage.missing}/a\x00b", f"file://{storage.missing}/a%00b", "~no-such-user-fz/m",
                         f"{storage.root}/{'x' * 300}"]),
    ).filter(safe_storage(storage))


def safe_storage(storage: Storage) -> Callable[[object], bool]:
    def safe(uri: object) -> bool:
        """Whether the node, resolving `uri`, could only find nothing or something under the module's tmp dir."""
        if not isinstance(uri, str):
            return True  # the node ignores a config storage_uri that is not a string
        try:
            path = resolve_storage_uri(uri)
        except Exception:
            return True  # nothing there, or the node fails before it looks at any file
        return path.is_relative_to(storage.root)
    return safe


def register_requests(storage: Storage) -> st.SearchStrategy[mpb.RegisterModelRequest]:
    return st.builds(mpb.RegisterModelRequest, name=names, storage_uri=storage_uris(storage), lazy=st.booleans(),
                     size_hint_bytes=uint64s, pinned=st.booleans(), min_copies=uint32s, load_timeout_s=floats,
                     runtime=runtimes)


def management_requests(storage: Storage) -> st.SearchStrategy[tuple[str, Any]]:
    def of(method: str, strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, Any]]:
        return strategy.map(lambda request: (method, request))

    registrations = of("RegisterModel", register_requests(storage))
    return st.one_of(
        registrations, registrations,  # the request with the most fields, twice as often
        of("UnregisterModel", st.builds(mpb.UnregisterModelRequest, name=names)),
        of("GetModelStatus", st.builds(mpb.GetModelStatusRequest, name=names)),
        of("ListModels", st.builds(mpb.ListModelsRequest, prefix=texts, page_size=uint32s, page_token=texts)),
        of("SetAlias", st.builds(mpb.SetAliasRequest, alias=names, model=names, auto_delete=st.booleans())),
        of("GetAlias", st.builds(mpb.GetAliasRequest, alias=names)),
        of("DeleteAlias", st.builds(mpb.DeleteAliasRequest, alias=names)),
        of("ListAliases", st.builds(mpb.ListAliasesRequest, prefix=texts, page_size=uint32s, page_token=texts)),
        of("ListNodes", st.just(mpb.ListNodesRequest())),
    )


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), int64s, st.integers(), floats, st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)


def configs(storage: Storage) -> st.SearchStrategy[str]:
    """RepositoryModelLoad's `config` string: meshserve's keys with any values, any JSON, not JSON at all."""
    keys = st.fixed_dictionaries({}, optional={
        "storage_uri": st.one_of(storage_uris(storage), json_values),
        "runtime": st.one_of(runtimes, json_values),
        "pinned": st.one_of(st.booleans(), json_values),
        "min_copies": st.one_of(st.integers(-5, 200), int64s, st.integers(), floats, json_values),
        "load_timeout_s": st.one_of(floats, st.integers(), json_values),
        "size_hint": st.one_of(uint64s, st.text(max_size=25), json_values),
    })
    return st.one_of(
        keys.map(json.dumps),
        json_values.map(json.dumps),
        texts,
        st.sampled_from(["", " ", "{", "}", "null", "[]", "NaN", "-Infinity", '{"storage_uri": null}',
                         '{"min_copies": 1e400}', '{"min_copies": 100000000000000000000000}', '{"a": 1, "a": 2}',
                         '{"size_hint": "12345678901234567890123"}', '{"load_timeout_s": -Infinity}',
                         '{"load_timeout_s": NaN}', '{"runtime": "any"}',
                         # digits int() refuses, too deep to parse
                         '{"size_hint": "\u00b2"}', '{"size_hint": "%s"}' % ("9" * 5000), '{"a": 1%s}' % ("0" * 5000)]),
        st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth),
    ).filter(lambda text: safe_storage(storage)(_config_storage(text)))


def _config_storage(text: str) -> object:
    try:
        config = json.loads(text)
    except Exception:
        return None
    return config.get("storage_uri") if isinstance(config, dict) else None


repository_params = st.one_of(
    st.builds(pb.ModelRepositoryParameter, bool_param=st.booleans()),
    st.builds(pb.ModelRepositoryParameter, int64_param=int64s),
    st.builds(pb.ModelRepositoryParameter, string_param=st.one_of(texts, st.sampled_from(
        ["0", "1", "12345", "-1", "1e3", "\u00b2", "\u0661", "9" * 5000]))),
    st.builds(pb.ModelRepositoryParameter, bytes_param=st.binary(max_size=32)),
    st.just(pb.ModelRepositoryParameter()),
)
# Uploads go to the node's repository (a tmp dir) under the model's name: a file where this or an earlier example
# made a directory, or the reverse ('1', '1/model.onnx/x'), is refused as the rest that is wrong (absolute, empty,
# '..', NUL, a too long name).
upload_paths = st.one_of(
    st.sampled_from(["1/model.onnx", "2/model.onnx", "3//model.onnx", "./1/model.onnx", "1/extra.bin", "model.onnx",
                     "config.pbtxt", "", ".", "..", "../x", "/abs", "1/../x", "1/..", "a\x00b", "y" * 300,
                     "1/model.onnx/x", "1", "1/."]),
    st.text(max_size=10).filter(lambda p: "/" not in p),
)


@st.composite
def load_requests(draw: st.DrawFn, storage: Storage) -> pb.RepositoryModelLoadRequest:
    request = pb.RepositoryModelLoadRequest(repository_name=draw(texts), model_name=draw(names))
    params = request.parameters
    if draw(st.booleans()):
        params["config"].string_param = draw(configs(storage))
    elif draw(st.booleans()):
        params["config"].CopyFrom(draw(repository_params))
    for key in (wire.LAZY, wire.SIZE_HINT, wire.COPY):
        if draw(st.booleans()):
            params[key].CopyFrom(draw(repository_params))
    for path in draw(st.lists(upload_paths, max_size=2)):
        params["file:" + path].CopyFrom(draw(repository_params))
    for key, value in draw(st.dictionaries(texts, repository_params, max_size=2)).items():
        params[key].CopyFrom(value)
    return request


@st.composite
def unload_requests(draw: st.DrawFn) -> pb.RepositoryModelUnloadRequest:
    request = pb.RepositoryModelUnloadRequest(repository_name=draw(texts), model_name=draw(names))
    if draw(st.booleans()):
        request.parameters[wire.UNREGISTER].CopyFrom(draw(repository_params))
    for key, value in draw(st.dictionaries(texts, repository_params, max_size=2)).items():
        request.parameters[key].CopyFrom(value)
    return request


@st.composite
def model_infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """Tensors for a real model (or for a name that is none), in any version, with a forged hop now and then."""
    real = draw(st.sampled_from([True] * 4 + [False]))
    model = draw(st.sampled_from(sorted(INFER_MODELS)) if real else names)
    inputs, outputs = INFER_MODELS.get(model, INFER_MODELS["mlp"])
    request = draw(infer_requests(inputs, outputs, model))
    if draw(st.sampled_from([False] * 4 + [True])):
        request.model_version = draw(st.one_of(st.sampled_from(["1", "2", "0", "-1", "99999999999999999999"]), texts))
    if draw(st.sampled_from([False] * 4 + [True])):
        hop = draw(st.one_of(st.sampled_from(["0|copy|", "1|load|n0", "1|load-last|", "2|any|x", "9|copy|a,b", ""]),
                             texts))
        request.parameters[PARAMETER_KEY].string_param = hop
    return request


# ---- the explicit examples' helpers --------------------------------------------------------------------------


def load_request(model: str, **parameters: str | bytes | bool) -> pb.RepositoryModelLoadRequest:
    request = pb.RepositoryModelLoadRequest(model_name=model)
    for key, value in parameters.items():
        key = key.replace("__", ".").replace("file_", "file:")
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        elif isinstance(value, bytes):
            request.parameters[key].bytes_param = value
        else:
            request.parameters[key].string_param = value
    return request


def assert_status(rpc: Rpc, method: str, request: Any, expected: grpc.StatusCode, says: str) -> str:
    """The call ends with `expected`, its message matching `says`, and the node is live after it."""
    code, details = rpc.status(method, request)
    rpc.assert_live(method)
    assert code == expected and re.search(says, details), f"{code.name}: {details[:300]}"
    return details


Bad = Code.INVALID_ARGUMENT
