"""Aliases in a real mesh: two node processes, a real etcd, tritonclient and the management service."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from deploy.local.models import mlp_reference, write_matmul_chain, write_mlp
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from meshpb import mpb
from tests.integration.conftest import start_nodes, write_broken
from tests.integration.helpers import manage, wait_until

pytestmark = pytest.mark.timeout(120)
X = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("alias-repo")
    for seed, name in enumerate(("m1", "m2", "m3", "m4", "m5")):
        write_mlp(root, name, approx_bytes=100_000, seed=seed)
    write_broken(root)
    return root


@pytest.fixture(scope="module")
def mesh(etcd: EtcdProcess, repo: Path) -> Iterator[list[NodeProcess]]:
    nodes = start_nodes(etcd, repo, 2, extra_args=["--alias-retire-after", "1", "--no-proactive-loads"])
    yield nodes
    for node in nodes:
        node.stop()


def x_input() -> list[aioclient.InferInput]:
    inp = aioclient.InferInput("INPUT0", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    return [inp]


async def answer(client: aioclient.InferenceServerClient, name: str) -> tuple[str, np.ndarray]:
    result = await client.infer(name, x_input())
    return result.get_response().model_name, result.as_numpy("OUTPUT0")


async def set_alias(target: str, alias: str, model: str, auto_delete: bool = False) -> mpb.Alias:
    found = await manage(target, "SetAlias", mpb.SetAliasRequest(alias=alias, model=model, auto_delete=auto_delete))
    assert isinstance(found, mpb.Alias)
    return found


async def status(target: str, model: str) -> mpb.ModelStatus:
    found = await manage(target, "GetModelStatus", mpb.GetModelStatusRequest(name=model))
    assert isinstance(found, mpb.ModelStatus)
    return found


async def get_alias(target: str, alias: str) -> mpb.Alias:
    found = await manage(target, "GetAlias", mpb.GetAliasRequest(alias=alias))
    assert isinstance(found, mpb.Alias)
    return found


async def model_names(target: str, prefix: str = "") -> set[str]:
    listed = await manage(target, "ListModels", mpb.ListModelsRequest(prefix=prefix))
    return {m.name for m in listed.models}


async def test_requests_to_an_alias_are_served_by_its_model_through_every_node(
        mesh: list[NodeProcess], repo: Path) -> None:
    alias = await set_alias(mesh[0].target, "tenant-a", "m1")
    assert alias.model == "m1" and alias.previous_model == ""
    for node in mesh:
        async with aioclient.InferenceServerClient(node.target) as client:
            served_by, output = await answer(client, "tenant-a")
            assert served_by == "m1"
            np.testing.assert_allclose(output, mlp_reference(repo / "m1", X), rtol=1e-4, atol=1e-5)
            metadata = await client.get_model_metadata("tenant-a")
            assert metadata.name == "tenant-a" and metadata.inputs[0].name == "INPUT0"
            assert await client.is_model_ready("tenant-a")
    assert (await status(mesh[1].target, "m1")).aliases == ["tenant-a"]


async def test_switching_under_load_fails_no_request_and_loads_as_many_copies_first(
        mesh: list[NodeProcess], repo: Path) -> None:
    await set_alias(mesh[0].target, "tenant-b", "m2")
    # Two copies of the old model: one on each node.
    for node in mesh:
        await manage(node.target, "RegisterModel", mpb.RegisterModelRequest(name="m2", storage_uri=str(repo / "m2")))
    served: list[str] = []
    failures: list[str] = []
    switched = asyncio.Event()
    after_switch: list[str] = []

    async def caller(target: str) -> None:
        async with aioclient.InferenceServerClient(target) as client:
            while not switched.is_set() or len(after_switch) < 40:
                try:
                    name, output = await answer(client, "tenant-b")
                except InferenceServerException as error:
                    failures.append(str(error))
                    continue
                np.testing.assert_allclose(output, mlp_reference(repo / name, X), rtol=1e-4, atol=1e-5)
                (after_switch if switched.is_set() else served).append(name)

    callers = [asyncio.create_task(caller(node.target)) for node in mesh for _ in range(2)]
    await wait_until(lambda: len(served) >= 20, 10, "20 answers through tenant-b before the switch")
    result = await set_alias(mesh[1].target, "tenant-b", "m3")
    switched.set()
    await asyncio.wait_for(asyncio.gather(*callers), 30)
    assert not failures
    assert result.model == "m3" and result.previous_model == "m2"
    assert set(served) <= {"m2", "m3"} and "m2" in served
    # Each node's watch moves within milliseconds; by the 40th answer after the switch all go to m3.
    assert after_switch[-10:] == ["m3"] * 10
    copies = (await status(mesh[0].target, "m3")).copies
    assert sorted(c.state for c in copies) == ["loaded", "loaded"], copies


async def test_a_failed_target_load_leaves_the_alias_where_it_was_and_says_why(mesh: list[NodeProcess]) -> None:
    await set_alias(mesh[0].target, "tenant-c", "m4")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await set_alias(mesh[0].target, "tenant-c", "broken")
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "stays on 'm4'" in raised.value.details() and "broken" in raised.value.details()
    got = await get_alias(mesh[1].target, "tenant-c")
    assert got.model == "m4" and got.switching_to == "" and "broken" in got.last_error
    async with aioclient.InferenceServerClient(mesh[1].target) as client:
        assert (await answer(client, "tenant-c"))[0] == "m4"


async def test_auto_delete_unregisters_the_old_model_once_no_alias_points_at_it(
        mesh: list[NodeProcess], repo: Path) -> None:
    target = mesh[0].target
    await manage(target, "RegisterModel", mpb.RegisterModelRequest(name="old", storage_uri=str(repo / "m5"),
                                                                     lazy=True))
    await set_alias(target, "tenant-d", "old", auto_delete=True)
    await set_alias(target, "tenant-e", "old")
    await set_alias(target, "tenant-d", "m5", auto_delete=True)
    await asyncio.sleep(2.0)  # past the 1 s grace: "old" stays, tenant-e still points at it
    assert (await status(target, "old")).aliases == ["tenant-e"]
    await manage(target, "DeleteAlias", mpb.DeleteAliasRequest(alias="tenant-e"))
    await manage(target, "DeleteAlias", mpb.DeleteAliasRequest(alias="tenant-d"))  # m5 was marked by it too

    async def both_retired() -> bool:
        return not await model_names(mesh[1].target) & {"old", "m5"}

    await wait_until(both_retired, 10, "'old' and 'm5' to be unregistered once unaliased")
    assert {"m1", "m2", "m3", "m4"} <= await model_names(mesh[1].target)


@pytest.mark.parametrize(("method", "request_", "code", "words"), [
    ("SetAlias", mpb.SetAliasRequest(alias="m1", model="m2"), grpc.StatusCode.ALREADY_EXISTS, "registered model"),
    ("SetAlias", mpb.SetAliasRequest(alias="x", model="nope"), grpc.StatusCode.NOT_FOUND, "no such model"),
    ("SetAlias", mpb.SetAliasRequest(alias="", model="m1"), grpc.StatusCode.INVALID_ARGUMENT, "invalid model name"),
    ("GetAlias", mpb.GetAliasRequest(alias="nope"), grpc.StatusCode.NOT_FOUND, "does not exist"),
    ("DeleteAlias", mpb.DeleteAliasRequest(alias="nope"), grpc.StatusCode.NOT_FOUND, "does not exist"),
])
async def test_bad_alias_requests_get_a_clear_status(mesh: list[NodeProcess], method: str, request_: object,
                                                     code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await manage(mesh[0].target, method, request_)
    assert raised.value.code() == code and words in raised.value.details()


async def test_an_aliased_model_cannot_be_unregistered_nor_an_alias_name_registered(
        mesh: list[NodeProcess], repo: Path) -> None:
    await set_alias(mesh[0].target, "tenant-f", "m1")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await manage(mesh[1].target, "UnregisterModel", mpb.UnregisterModelRequest(name="m1"))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "tenant-f" in raised.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await manage(mesh[1].target, "RegisterModel",
                     mpb.RegisterModelRequest(name="tenant-f", storage_uri=str(repo / "m1")))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await set_alias(mesh[0].target, "tenant-g", "tenant-f")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "is an alias" in raised.value.details()


async def test_a_switch_overtaken_by_another_switch_of_its_alias_aborts_and_the_other_one_stands(
        mesh: list[NodeProcess], tmp_path: Path) -> None:
    # Ten thousand tiny MatMuls: a small file whose load takes about a second, while the other switch is done in
    # a fraction of one: the two switches overlap whatever the timing of the calls.
    slow = write_matmul_chain(tmp_path, "slow", width=4, depth=10_000)
    await manage(mesh[0].target, "RegisterModel", mpb.RegisterModelRequest(name="slow", storage_uri=str(slow),
                                                                           lazy=True))
    await set_alias(mesh[0].target, "tenant-h", "m1")
    first = asyncio.create_task(set_alias(mesh[0].target, "tenant-h", "slow"))

    async def first_is_switching() -> bool:
        return (await get_alias(mesh[1].target, "tenant-h")).switching_to == "slow"

    await wait_until(first_is_switching, 10, "the switch of tenant-h to 'slow' to mark the alias")
    second = await set_alias(mesh[1].target, "tenant-h", "m4")
    assert second.model == "m4" and second.previous_model == "m1"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await first
    assert raised.value.code() == grpc.StatusCode.ABORTED and "changed by another call" in raised.value.details()
    final = await get_alias(mesh[0].target, "tenant-h")
    assert final.model == "m4" and final.switching_to == ""


async def test_a_marked_model_is_retired_even_when_the_node_that_moved_its_alias_dies(
        etcd: EtcdProcess, repo: Path) -> None:
    nodes = start_nodes(etcd, repo, 2, extra_args=["--alias-retire-after", "2", "--no-proactive-loads"])
    try:
        await set_alias(nodes[0].target, "tenant-x", "m1", auto_delete=True)
        await set_alias(nodes[0].target, "tenant-x", "m2")  # m1: marked, and no alias points at it now
        nodes[0].kill()  # before its grace period ends

        async def m1_retired() -> bool:
            return "m1" not in await model_names(nodes[1].target, prefix="m")

        await wait_until(m1_retired, 15, "the surviving node to unregister the marked 'm1'")
        assert "m2" in await model_names(nodes[1].target, prefix="m")
    finally:
        for node in nodes:
            node.stop()


async def test_a_switch_the_caller_gives_up_on_leaves_no_switching_marker(
        mesh: list[NodeProcess], tmp_path: Path) -> None:
    big = write_mlp(tmp_path, "big", approx_bytes=40_000_000)  # its load takes far longer than 50 ms
    await manage(mesh[0].target, "RegisterModel", mpb.RegisterModelRequest(name="big", storage_uri=str(big),
                                                                           lazy=True))
    await set_alias(mesh[0].target, "tenant-i", "m1")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await manage(mesh[0].target, "SetAlias", mpb.SetAliasRequest(alias="tenant-i", model="big"), deadline_s=0.05)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def marker_cleared() -> bool:
        return (await get_alias(mesh[1].target, "tenant-i")).switching_to == ""

    await wait_until(marker_cleared, 10, "the abandoned switch of tenant-i to clear its switching marker")
    assert (await get_alias(mesh[1].target, "tenant-i")).model == "m1"
