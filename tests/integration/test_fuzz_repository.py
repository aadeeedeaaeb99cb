"""Property-based fuzzing of RepositoryModelLoad/Unload and ModelInfer, end to end through the real gRPC servicers
of one node process, and the explicit examples the fuzzing of those requests found.

The property, its one documented exception (LOAD_FAILED) and the storage fuzzing may point at: tests/integration/
fuzz_support.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from meshpb import pb
from tests.integration.fuzz_support import (
    FUZZ,
    INFER_STATUSES,
    Bad,
    Code,
    Rpc,
    Storage,
    assert_status,
    check,
    load_request,
    load_requests,
    make_storage,
    model_infer_requests,
    rpc_on,
    running_fuzz_node,
    unload_requests,
)

pytestmark = pytest.mark.timeout(180)


# ---- this module's node (fuzz_support.running_fuzz_node) and the storage it may be pointed at ---------------


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Storage:
    return make_storage(tmp_path_factory)


@pytest.fixture(scope="module")
def fuzz_node(etcd: EtcdProcess, model_repo: Path) -> Iterator[NodeProcess]:
    with running_fuzz_node(etcd, model_repo) as process:
        yield process


@pytest.fixture(scope="module")
def rpc(fuzz_node: NodeProcess) -> Iterator[Rpc]:
    with rpc_on(fuzz_node) as calls:
        yield calls


# ---- the properties -----------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_every_repository_load_and_unload_ends_with_a_clients_status(
        rpc: Rpc, storage: Storage, data: st.DataObject) -> None:
    method, request = data.draw(st.one_of(
        load_requests(storage).map(lambda r: ("RepositoryModelLoad", r)),
        unload_requests().map(lambda r: ("RepositoryModelUnload", r)),
    ), label="request")
    check(rpc, method, request)


@settings(FUZZ, max_examples=400)
@given(request=model_infer_requests())
def test_every_model_infer_ends_with_a_clients_status(rpc: Rpc, request: pb.ModelInferRequest) -> None:
    check(rpc, "ModelInfer", request, INFER_STATUSES)


def test_the_node_served_a_real_model_after_the_fuzzing(rpc: Rpc) -> None:
    request = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        request.raw_input_contents.append(b"\x00" * 64)
    response = rpc("ModelInfer", request)
    assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"]


# ---- inputs the fuzzing found: each kept as an explicit example ----------------------------------------------
# Each once ended INTERNAL; now a client's status.


def test_config_nested_too_deep(rpc: Rpc) -> None:
    assert_status(rpc, "RepositoryModelLoad", load_request("fz-deep", config="[" * 1000 + "]" * 1000), Bad,
                  r"^failed to load 'fz-deep': the 'config' parameter is not valid JSON: nested too deeply$")


def test_config_with_a_5000_digit_number(rpc: Rpc) -> None:
    assert_status(rpc, "RepositoryModelLoad", load_request("fz-digits", config='{"a": 1%s}' % ("0" * 5000)), Bad,
                  r"^failed to load 'fz-digits': the 'config' parameter is not valid JSON: Exceeds the limit "
                  r"\(4300 digits\)")


@pytest.mark.parametrize("where", ["parameter", "config"])
@pytest.mark.parametrize("hint", ["\u00b2", "9" * 5000], ids=["superscript-two", "5000-digits"])
def test_size_hint_digits_int_refuses(rpc: Rpc, where: str, hint: str) -> None:
    request = (load_request("fz-hint", meshserve__size_hint=hint, meshserve__lazy=True) if where == "parameter"
               else load_request("fz-hint", config=json.dumps({"size_hint": hint}), meshserve__lazy=True))
    assert_status(rpc, "RepositoryModelLoad", request, Bad, r"^size_hint must be a whole number of bytes in ASCII "
                                                            r"digits, from 0 to 9223372036854775807$")


@pytest.mark.parametrize(("path", "says"), [
    ("a\x00b", r"^Invalid file path in load parameters: upload path 'a\\x00b' contains a NUL byte$"),
    ("y" * 300, r"^Invalid file path in load parameters: upload path 'y+\.\.\. \(300 characters\)' has a name "
                r"longer than 255 bytes"),
], ids=["nul", "too-long"])
def test_upload_path_the_file_system_refuses(rpc: Rpc, path: str, says: str) -> None:
    assert_status(rpc, "RepositoryModelLoad", load_request("fz-upload", **{"file_" + path: b"x"}), Bad, says)


def test_upload_file_over_a_directory(rpc: Rpc) -> None:
    request = load_request("fz-clash", meshserve__lazy=True)
    request.parameters["file:1/model.onnx"].bytes_param = b"x"
    request.parameters["file:1/model.onnx/x"].bytes_param = b"x"
    assert_status(rpc, "RepositoryModelLoad", request, Bad,
                  r"^uploads 'file:1/model.onnx' and 'file:1/model.onnx/x' clash: '1/model.onnx' cannot be both a "
                  r"file and a directory$")


def test_load_failure_of_a_copy_of_an_unknown_model(rpc: Rpc) -> None:
    assert_status(rpc, "RepositoryModelLoad", load_request("fz-never-registered", meshserve__copy=True),
                  Code.NOT_FOUND, r"^no copy of model 'fz-never-registered' on this node: ")
