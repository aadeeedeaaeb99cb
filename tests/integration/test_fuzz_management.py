"""Property-based fuzzing of every management request, end to end through the real gRPC servicers of one node
process, and the explicit examples the fuzzing of RegisterModel, SetAlias and names found.

The property, its one documented exception (LOAD_FAILED) and the storage fuzzing may point at: tests/integration/
fuzz_support.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from meshpb import mpb, pb
from tests.integration.fuzz_support import (
    FUZZ,
    Bad,
    Code,
    Rpc,
    Storage,
    assert_status,
    check,
    make_storage,
    management_requests,
    rpc_on,
    running_fuzz_node,
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


# ---- the property -------------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=500)
@given(data=st.data())
def test_every_management_request_ends_with_a_clients_status(
        rpc: Rpc, storage: Storage, data: st.DataObject) -> None:
    method, request = data.draw(management_requests(storage), label="request")
    check(rpc, method, request)


# ---- inputs the fuzzing found: each kept as an explicit example ----------------------------------------------
# Each once ended INTERNAL; now a client's status, or (test_load_failure_*) the exact status of a failed load's cause:
# INTERNAL for the model itself (LOAD_FAILED), as Triton answers it.


@pytest.mark.parametrize("uri", ["{missing}/a\x00b", "file://{missing}/a%00b"], ids=["path", "file-uri"])
def test_storage_uri_with_nul(rpc: Rpc, storage: Storage, uri: str) -> None:
    details = assert_status(rpc, "RegisterModel", mpb.RegisterModelRequest(
        name="fz-nul", storage_uri=uri.format(missing=storage.missing), lazy=True), Bad,
        r"^storage_uri '.*a\\x00b' contains a NUL byte$")
    assert "\x00" not in details


def test_storage_uri_of_an_unknown_users_home(rpc: Rpc) -> None:
    assert_status(rpc, "RegisterModel", mpb.RegisterModelRequest(
        name="fz-home", storage_uri="~no-such-user-fz/m", lazy=True), Bad,
        r"^storage_uri '~no-such-user-fz/m': no such user's home directory '~no-such-user-fz'$")


def test_storage_uri_with_a_too_long_name(rpc: Rpc, storage: Storage) -> None:
    assert_status(rpc, "RegisterModel", mpb.RegisterModelRequest(
        name="fz-long", storage_uri=f"{storage.root}/{'x' * 300}", lazy=True), Bad,
        r"^storage_uri '.*' has a name longer than 255 bytes: 'x+\.\.\. \(300 characters\)'$")



def test_load_failure_of_a_broken_model_file_is_internal_with_the_runtimes_reason(rpc: Rpc, storage: Storage) -> None:
    # As Triton answers a model it cannot load: the request is well formed, the model file is not.
    assert_status(rpc, "RegisterModel", mpb.RegisterModelRequest(
        name="fz-broken", storage_uri=str(storage.root / "broken")), Code.INTERNAL,
        r"^load failed for model 'fz-broken': failed to load model 'fz-broken' version 1 from "
        r"\S+/broken/1/model\.onnx: \[ONNXRuntimeError\] : 7 : INVALID_PROTOBUF : ")


def test_load_failure_of_a_directory_without_versions(rpc: Rpc, storage: Storage) -> None:
    assert_status(rpc, "RegisterModel", mpb.RegisterModelRequest(
        name="fz-empty", storage_uri=str(storage.root / "empty")), Code.NOT_FOUND,
        r"^load failed for model 'fz-empty': .*has no available versions")


def test_load_failure_of_a_model_bigger_than_any_node(rpc: Rpc, storage: Storage) -> None:
    assert_status(rpc, "RegisterModel", mpb.RegisterModelRequest(
        name="fz-huge", storage_uri=storage.loadable[0], size_hint_bytes=2**64 - 1), Code.RESOURCE_EXHAUSTED,
        r"^load failed for model 'fz-huge': ")


def test_load_failure_of_a_load_timing_out_is_unavailable_naming_the_model_and_its_timeout(
        rpc: Rpc, storage: Storage) -> None:
    # load_timeout_s=1e-300 is valid (> 0): no load is that quick. It may load in time later or on another node.
    assert_status(rpc, "RegisterModel", mpb.RegisterModelRequest(
        name="fz-quick", storage_uri=storage.loadable[0], load_timeout_s=1e-300), Code.UNAVAILABLE,
        r"^load failed for model 'fz-quick': loading model 'fz-quick' version 1 timed out after 1e-300s$")


def test_load_failure_of_an_alias_target_is_the_targets_load_failure(rpc: Rpc, storage: Storage) -> None:
    code, details = rpc.status("RegisterModel", mpb.RegisterModelRequest(
        name="fz-target", storage_uri=str(storage.root / "broken"), lazy=True))
    assert code == Code.OK, details
    try:
        assert_status(rpc, "SetAlias", mpb.SetAliasRequest(alias="fz-alias-of-broken", model="fz-target"),
                      Code.INTERNAL, r"^alias 'fz-alias-of-broken' not set: loading 'fz-target' failed: (\S+): "
                                     r"no copy of model 'fz-target' on this node: failed to load model "
                                     r"'fz-target' version 1 from \S+/broken/1/model\.onnx: \[ONNXRuntimeError\] : 7 : "
                                     r"INVALID_PROTOBUF : ")
    finally:
        rpc.status("UnregisterModel", mpb.UnregisterModelRequest(name="fz-target"))


def test_a_model_an_alias_points_at_is_neither_unloaded_nor_unregistered(rpc: Rpc, storage: Storage) -> None:
    registration = mpb.RegisterModelRequest(name="fz-aimed", storage_uri=storage.loadable[0])
    code, details = rpc.status("RegisterModel", registration)
    assert code == Code.OK, details
    code, details = rpc.status("SetAlias", mpb.SetAliasRequest(alias="fz-front", model="fz-aimed"))
    assert code == Code.OK, details
    try:
        for method, request, verb in (
                ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="fz-aimed"), "unload"),
                ("UnregisterModel", mpb.UnregisterModelRequest(name="fz-aimed"), "unregister")):
            assert_status(rpc, method, request, Code.FAILED_PRECONDITION,
                          rf"^cannot {verb} model 'fz-aimed': alias 'fz-front' points at it; move or delete alias "
                          r"'fz-front' first$")
        assert rpc("ModelReady", pb.ModelReadyRequest(name="fz-front")).ready
    finally:
        rpc.status("DeleteAlias", mpb.DeleteAliasRequest(alias="fz-front"))
    assert rpc.status("UnregisterModel", mpb.UnregisterModelRequest(name="fz-aimed")) == (Code.OK, "")


@pytest.mark.parametrize("method", ["GetModelStatus", "ModelInfer"])
def test_not_found_for_a_20k_character_name(rpc: Rpc, method: str) -> None:
    request = (pb.ModelInferRequest(model_name="x" * 20_000) if method == "ModelInfer"
               else mpb.GetModelStatusRequest(name="x" * 20_000))
    details = assert_status(rpc, method, request, Code.NOT_FOUND, r"\.\.\. \(message clipped: \d+ characters in all\)$")
    assert len(details.encode()) <= 2048
