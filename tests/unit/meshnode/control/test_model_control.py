"""ModelControl over the real registry, aliases, cache, replica and mesh state (fake etcd, fake runtime)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from meshnode.background import BackgroundTasks
from meshnode.control.model_control import IndexEntry
from meshnode.control.registration import CopyHere, Registration
from meshnode.control.repository_registration import RepositoryRegistration
from meshnode.errors import AlreadyExists, FailedPrecondition, InvalidInput, LoadFailed, ModelNotFound
from meshnode.state.aliases import AliasRecord
from meshnode.state.registry import Copy, Failure, ModelRecord
from meshnode.storage.repository import ModelRepository
from placement.types import LOADED, LOADING
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import ME, NOW, LoadPlan, NodeParts, node_view, write_model

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeParts]:
    store = FakeStore()
    store.publish(node_view(ME), node_view("n2"))
    parts = await NodeParts(store, tmp_path / "repo").start()
    yield parts
    await parts.stop()


def elsewhere(tmp_path: Path, name: str, versions: tuple[str, ...] = ("1",)) -> Path:
    """A model directory outside the repository, for storage_uri."""
    return write_model(tmp_path / "elsewhere", name, versions)


# -- registering --------------------------------------------------------------------------------------


async def test_uploaded_files_are_stored_in_the_repository_registered_and_loaded_here(node: NodeParts) -> None:
    await node.control.load(Registration("up", files={"1/model.onnx": b"weights", "config.pbtxt": b'name: "up"'}))
    assert (node.repository / "up" / "1" / "model.onnx").read_bytes() == b"weights"
    assert (node.repository / "up" / "config.pbtxt").read_bytes() == b'name: "up"'
    record = node.record("up")
    assert (record.storage, record.runtime, record.enabled, record.size_hint) == \
        (str(node.repository.resolve() / "up"), "onnxruntime", True, None)
    assert node.runtime.loads == ["up@1"]
    assert [e.inflight for e in node.cache.entries("up")] == [0]  # loaded and released


async def test_a_storage_uri_is_registered_resolved_and_its_latest_version_loaded(node: NodeParts,
                                                                                  tmp_path: Path) -> None:
    directory = elsewhere(tmp_path, "m", ("1", "2"))
    await node.control.register(Registration("m", storage_uri=f"file://{directory}"))
    assert node.record("m").storage == str(directory.resolve())
    assert node.runtime.loads == ["m@2"]


async def test_a_model_in_the_repository_is_registered_by_name(node: NodeParts) -> None:
    write_model(node.repository, "scanned")
    await node.control.register(Registration("scanned"))
    assert node.record("scanned").storage == str(node.repository.resolve() / "scanned")
    assert node.runtime.loads == ["scanned@1"]


async def test_a_model_found_nowhere_is_not_found(node: NodeParts) -> None:
    with pytest.raises(ModelNotFound) as raised:
        await node.control.register(Registration("ghost"))
    assert str(raised.value) == ("failed to load 'ghost': not in the model repository and no storage_uri or files "
                                 "given")
    assert node.registry.get("ghost") is None


async def test_loading_a_registered_model_again_keeps_its_storage_and_copies_and_forgets_failures(
        node: NodeParts, tmp_path: Path) -> None:
    directory = elsewhere(tmp_path, "m")
    await node.control.register(Registration("m", storage_uri=str(directory), lazy=True))
    failed = {"n2": Failure(at=NOW, message="corrupt")}
    await node.registry.update("m", lambda r: replace(r, enabled=False, copies={"n2": Copy(state=LOADED, since=NOW)},
                                                      size_bytes=123, failures=failed) if r else None)
    await node.control.register(Registration("m", lazy=True))  # no files, no uri: the registration stands
    record = node.record("m")
    assert (record.storage, record.enabled, record.size_bytes, record.failures) == \
        (str(directory.resolve()), True, 123, {})
    assert record.copies == {"n2": Copy(state=LOADED, since=NOW)} and node.runtime.unloads == []


async def test_new_files_replace_the_model_unloading_its_copies_and_forgetting_copies_and_size(
        node: NodeParts) -> None:
    await node.control.register(Registration("m", files={"1/model.onnx": b"old"}))
    await node.recorded("m", lambda r: ME in r.copies and r.size_bytes == 100)
    await node.registry.update("m", lambda r: replace(r, copies={**r.copies, "n2": Copy(state=LOADED, since=NOW)})
                               if r else None)
    await node.control.register(Registration("m", files={"1/model.onnx": b"new"}, lazy=True))
    assert node.runtime.unloads == ["m@1"] and not node.cache.has_entry("m", "")
    record = node.record("m")
    assert (record.copies, record.size_bytes) == ({}, None)  # every copy in the mesh is stale now
    assert (node.repository / "m" / "1" / "model.onnx").read_bytes() == b"new"


async def test_a_new_storage_uri_replaces_the_model_and_the_new_one_is_loaded(node: NodeParts,
                                                                              tmp_path: Path) -> None:
    await node.control.register(Registration("m", storage_uri=str(elsewhere(tmp_path / "a", "m", ("1",)))))
    await node.control.register(Registration("m", storage_uri=str(elsewhere(tmp_path / "b", "m", ("1", "2")))))
    assert node.runtime.loads == ["m@1", "m@2"] and node.runtime.unloads == ["m@1"]
    assert [e.key for e in node.cache.entries("m")] == ["m@2"]


async def test_a_lazy_registration_loads_nothing_and_a_model_for_another_runtime_loads_nowhere_here(
        node: NodeParts, tmp_path: Path) -> None:
    await node.control.register(Registration("lazy", storage_uri=str(elsewhere(tmp_path, "lazy")), lazy=True))
    await node.control.register(Registration("t", storage_uri=str(elsewhere(tmp_path, "t")), runtime="triton"))
    assert node.record("lazy").runtime == "onnxruntime" and node.record("t").runtime == "triton"
    assert node.runtime.loads == []


async def test_keeping_fields_are_set_by_a_registration_and_kept_by_the_next_unless_it_says(
        node: NodeParts, tmp_path: Path) -> None:
    uri = str(elsewhere(tmp_path, "m"))
    await node.control.register(Registration("m", storage_uri=uri, lazy=True, size_hint_bytes=500, pinned=True,
                                             min_copies=2, load_timeout_s=9.0))
    record = node.record("m")
    assert (record.size_hint, record.pinned, record.min_copies, record.load_timeout_s) == (500, True, 2, 9.0)
    await node.control.register(Registration("m", lazy=True, min_copies=3))
    record = node.record("m")  # the size hint is replaced by every registration; the rest kept unless given
    assert (record.size_hint, record.pinned, record.min_copies, record.load_timeout_s) == (None, True, 3, 9.0)


async def test_an_alias_name_cannot_be_registered_as_a_model(node: NodeParts, tmp_path: Path) -> None:
    assert await node.aliases.write(AliasRecord(alias="front", model="m"), 0) is not None
    with pytest.raises(AlreadyExists, match="^'front' is an alias; a model needs a name of its own$"):
        await node.control.register(Registration("front", storage_uri=str(elsewhere(tmp_path, "front"))))
    with pytest.raises(InvalidInput, match="^invalid model name '../x'$"):
        await node.control.register(Registration("../x"))


async def test_a_registered_model_that_fails_to_load_stays_registered_and_the_load_fails(
        node: NodeParts, tmp_path: Path) -> None:
    node.runtime.plan("bad", LoadPlan(error=LoadFailed("model 'bad' is corrupt")))
    with pytest.raises(LoadFailed, match="^load failed for model 'bad': model 'bad' is corrupt$"):
        await node.control.register(Registration("bad", storage_uri=str(elsewhere(tmp_path, "bad"))))
    assert node.record("bad").enabled
    # Loading again is a retry now, whatever the backoff: a reload forgets failures.
    await node.control.register(Registration("bad"))
    assert node.runtime.loads == ["bad@1", "bad@1"]


async def test_a_peers_copy_request_loads_a_copy_here_and_changes_no_registration(node: NodeParts) -> None:
    await node.register("m", size_hint=300)
    await node.control.load(CopyHere("m"))
    assert node.runtime.loads == ["m@1"] and node.record("m").size_hint == 300
    with pytest.raises(LoadFailed, match="^no copy of model 'ghost' on this node: Request for unknown model: "
                                         "'ghost' is not found$"):
        await node.control.load(CopyHere("ghost"))
    with pytest.raises(InvalidInput):
        await node.control.load(CopyHere("a/b"))


def registration(node: NodeParts, background: BackgroundTasks, retry_s: float = 3600.0) -> RepositoryRegistration:
    return RepositoryRegistration(repository=ModelRepository(node.repository), registry=node.registry,
                                  runtime=node.runtime.name, background=background, clock=node.clock, retry_s=retry_s)


@pytest.fixture
async def background() -> AsyncIterator[BackgroundTasks]:
    tasks = BackgroundTasks()
    yield tasks
    await tasks.cancel()


async def test_the_repositorys_registration_registers_new_model_directories_lazily_once(
        node: NodeParts, background: BackgroundTasks) -> None:
    for name in ("a", "b", ".hidden"):
        write_model(node.repository, name)
    (node.repository / "not-a-model").mkdir()
    first = registration(node, background)
    first.start()
    await first.head_start(within_s=5.0)  # a repository of a few models: registered before the node serves
    assert sorted(node.registry.names()) == ["a", "b"]
    assert await first.wait() == 2
    assert sorted(node.registry.names()) == ["a", "b"] and node.runtime.loads == []
    assert node.record("a") == ModelRecord(name="a", storage=str(node.repository.resolve() / "a"), registered_at=NOW,
                                           updated_at=NOW, runtime="onnxruntime")
    await node.control.unload("a")
    again = registration(node, background)
    again.start()
    assert await again.wait() == 0
    assert node.record("a").enabled is False  # the registration never re-enables what an unload disabled


async def test_the_repositorys_models_are_served_before_their_registration_and_a_first_write_registers_one(
        node: NodeParts, background: BackgroundTasks) -> None:
    for name in ("m", "claimed", "idle"):
        write_model(node.repository, name)
    (node.repository / "not-a-model").mkdir()
    node.store.down = True  # the registration's first round fails: it tries again later
    running = registration(node, background, retry_s=0.05)
    running.start()
    await node.store.refusals.wait_len(1)
    assert not any(key.startswith("models/") for key in node.store.data)
    await node.use("m")  # a request served here: the view has the record the registration is to write
    assert node.runtime.loads == ["m@1"]
    for unknown in ("not-a-model", "ghost", ".hidden", "..", "../repo", "a\x00b", "x" * 300):
        assert node.registry.get(unknown) is None
    node.store.down = False
    assert await node.mesh.claim_load("claimed", "n2", frozenset()) == "n2"
    assert node.store.record("models/claimed")["copies"]["n2"]["state"] == LOADING  # registered by its claim
    await running.wait()
    await node.registry.wait_for("m", lambda r: r is not None and ME in r.copies, timeout=5)  # the copy flusher's
    assert node.record("idle") == ModelRecord(name="idle", storage=str(node.repository.resolve() / "idle"),
                                              registered_at=NOW, updated_at=NOW, runtime="onnxruntime")
    assert sorted(node.registry.names()) == ["claimed", "idle", "m"]
    write_model(node.repository, "later")
    assert node.registry.get("later") is None  # registration done: the repository is read no more


# -- unloading -----------------------------------------------------------------------------------------


async def test_unload_disables_the_model_in_the_mesh_and_unloads_it_here(node: NodeParts) -> None:
    await node.register("m")
    await node.use("m")
    await node.control.unload("m")
    assert node.record("m").enabled is False
    assert node.runtime.unloads == ["m@1"] and not node.cache.has_entry("m", "")


async def test_unregister_forgets_the_model(node: NodeParts) -> None:
    await node.register("m")
    await node.use("m")
    await node.control.unload("m", unregister=True)
    assert node.registry.get("m") is None and "models/m" not in node.store.data
    assert node.runtime.unloads == ["m@1"]


@pytest.mark.parametrize("unregister", [False, True], ids=["unload", "unregister"])
@pytest.mark.parametrize("alias", [AliasRecord(alias="front", model="m"),
                                   AliasRecord(alias="front", model="other", switching_to="m")],
                         ids=["points", "switches"])
async def test_a_model_an_alias_points_or_switches_to_can_be_neither_unloaded_nor_unregistered(
        node: NodeParts, alias: AliasRecord, unregister: bool) -> None:
    await node.register("m")
    await node.use("m")
    assert await node.aliases.write(alias, 0) is not None
    with pytest.raises(FailedPrecondition) as raised:
        await node.control.unload("m", unregister=unregister)
    assert str(raised.value) == (f"cannot {'unregister' if unregister else 'unload'} model 'm': alias 'front' "
                                 "points at it; move or delete alias 'front' first")
    assert node.record("m").enabled and node.cache.has_entry("m", "") and node.runtime.unloads == []


async def test_every_alias_of_a_model_is_named_and_once_they_moved_it_unloads(node: NodeParts) -> None:
    await node.register("m")
    await node.register("n")
    for alias in ("b", "a"):
        assert await node.aliases.write(AliasRecord(alias=alias, model="m"), 0) is not None
    with pytest.raises(FailedPrecondition, match="^cannot unload model 'm': aliases 'a', 'b' point at it; move or "
                                                 "delete aliases 'a', 'b' first$"):
        await node.control.unload("m")
    for alias in ("a", "b"):
        _, revision = await node.aliases.read(alias)
        assert await node.aliases.write(AliasRecord(alias=alias, model="n"), revision) is not None
    await node.control.unload("m")
    assert node.record("m").enabled is False


async def test_unloading_an_unregistered_model_is_not_found(node: NodeParts) -> None:
    for unregister in (False, True):
        with pytest.raises(ModelNotFound, match="^failed to unload 'ghost': model is not registered$"):
            await node.control.unload("ghost", unregister=unregister)


# -- the index -----------------------------------------------------------------------------------------


async def test_the_index_gives_each_models_state_in_the_mesh_in_name_order(node: NodeParts) -> None:
    def at(state: str) -> Copy:
        return Copy(state=state, since=NOW)

    await node.register("a-ready", copies={"n2": at(LOADED)})
    await node.register("b-loading", copies={"n2": at(LOADING)})
    await node.register("c-off", enabled=False, copies={"n2": at(LOADED)})
    await node.register("d-failed-on-n2", failures={"n2": Failure(at=NOW - 5, message="corrupt")})
    await node.register("e-idle")
    await node.register("f-dead-copy", copies={"gone": at(LOADED)})
    await node.register("g-here")
    await node.use("g-here")
    await node.register("h-failed-here")
    node.runtime.plan("h-failed-here", LoadPlan(error=LoadFailed("corrupt here")))
    with pytest.raises(LoadFailed):
        await node.use("h-failed-here")
    await node.register("i-loading-here", versions=("1", "2"))
    gate = asyncio.Event()
    node.runtime.plan("i-loading-here", LoadPlan(gate=gate))
    loading = asyncio.create_task(node.use("i-loading-here"))
    await node.runtime.loads.wait(lambda loads: "i-loading-here@2" in loads)
    assert node.control.index(ready_only=False) == [
        IndexEntry("a-ready", "", "READY", "copies: n2 (loaded)"),
        IndexEntry("b-loading", "", "LOADING", "copies: n2 (loading)"),
        IndexEntry("c-off", "", "UNAVAILABLE", "unloaded"),
        IndexEntry("d-failed-on-n2", "", "UNAVAILABLE", "load failed on n2: corrupt"),
        IndexEntry("e-idle", "", "", "registered; loads on first request"),
        IndexEntry("f-dead-copy", "", "", "registered; loads on first request"),  # its node left the mesh
        IndexEntry("g-here", "1", "READY", "copies: me (loaded)"),
        IndexEntry("h-failed-here", "", "UNAVAILABLE", "load failed: corrupt here"),
        IndexEntry("i-loading-here", "2", "LOADING", "copies: me (loading)"),
    ]
    assert [e.name for e in node.control.index(ready_only=True)] == ["a-ready", "g-here"]
    gate.set()
    await loading


async def test_this_nodes_copies_come_from_its_cache_which_is_ahead_of_its_record(node: NodeParts) -> None:
    claimed = await node.register("m", copies={ME: Copy(state=LOADING, since=NOW - 9),
                                               "n2": Copy(state=LOADED, since=NOW)})
    assert node.control.copies(claimed) == {"n2": Copy(state=LOADED, since=NOW)}  # the claim failed here
    await node.use("m")
    assert node.control.copies(claimed) == {"n2": Copy(state=LOADED, since=NOW),  # loaded here before recorded
                                            ME: Copy(state=LOADED, since=NOW - 9)}


async def test_this_nodes_load_failures_come_from_its_cache_which_is_ahead_of_its_record(node: NodeParts) -> None:
    recorded = await node.register("m", failures={"n2": Failure(at=NOW - 5, message="corrupt on n2")})
    node.runtime.plan("m", LoadPlan(error=LoadFailed("model 'm' is corrupt")))
    with pytest.raises(LoadFailed):
        await node.use("m")
    failures = node.control.failures(recorded)  # the record as it was before this node's failure
    assert failures["n2"]["message"] == "corrupt on n2" and "model 'm' is corrupt" in failures[ME]["message"]


# -- a failed load's status: INTERNAL as Triton's, unless its cause has a status a client can act on -----------


async def test_a_broken_model_file_fails_to_load_with_internal(node: NodeParts, tmp_path: Path) -> None:
    node.runtime.plan("bad", LoadPlan(error=LoadFailed("model 'bad' is corrupt")))
    with pytest.raises(LoadFailed) as raised:
        await node.control.register(Registration("bad", storage_uri=str(elsewhere(tmp_path, "bad"))))
    assert raised.value.code == grpc.StatusCode.INTERNAL


async def test_a_model_without_versions_fails_to_load_with_not_found(node: NodeParts, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadFailed, match="^load failed for model 'e': Request for unknown model: 'e' has no "
                                         "available versions$") as raised:
        await node.control.register(Registration("e", storage_uri=str(tmp_path / "empty")))
    assert (raised.value.code, raised.value.retry_elsewhere) == (grpc.StatusCode.NOT_FOUND, False)


async def test_a_copy_of_an_unregistered_model_fails_with_not_found(node: NodeParts) -> None:
    with pytest.raises(LoadFailed, match="^no copy of model 'ghost' on this node: ") as raised:
        await node.control.load(CopyHere("ghost"))
    assert raised.value.code == grpc.StatusCode.NOT_FOUND


async def test_a_model_too_big_for_any_node_fails_to_load_with_resource_exhausted(
        node: NodeParts, tmp_path: Path) -> None:
    with pytest.raises(LoadFailed, match="^load failed for model 'huge': ") as raised:
        await node.control.register(Registration("huge", storage_uri=str(elsewhere(tmp_path, "huge")),
                                                 size_hint_bytes=2**64 - 1))
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_load_that_times_out_fails_with_unavailable_naming_the_model_and_its_timeout(
        node: NodeParts, tmp_path: Path) -> None:
    node.runtime.plan("slow", LoadPlan(gate=asyncio.Event()))
    with pytest.raises(LoadFailed, match="^load failed for model 'slow': loading model 'slow' version 1 timed out "
                                         "after 0.05s$") as raised:
        await node.control.register(Registration("slow", storage_uri=str(elsewhere(tmp_path, "slow")),
                                                 load_timeout_s=0.05))
    # It may load in time later, or on another node: a status clients retry, unlike a broken file's INTERNAL.
    assert (raised.value.code, raised.value.retry_elsewhere) == (grpc.StatusCode.UNAVAILABLE, True)


async def test_a_load_through_a_node_without_room_puts_the_model_where_there_is_room(
        node: NodeParts, tmp_path: Path) -> None:
    directory = elsewhere(tmp_path, "big")
    with pytest.raises(LoadFailed) as nowhere:  # more than any node holds
        await node.control.register(Registration("big", storage_uri=str(directory), size_hint_bytes=10**15))
    assert nowhere.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "elsewhere: no node to place a copy on" in str(nowhere.value)

    fits_n2 = 5_000  # more than this node's whole capacity (1,000 bytes), less than n2's
    node.store.publish(node_view("n2", runtime=node.runtime.name))
    await node.store.settle()  # the watch delivered it
    await node.control.register(Registration("big", size_hint_bytes=fits_n2))
    assert node.peers.loads == [("n2", "big")] and node.runtime.loads == []

    await node.registry.update("big", lambda r: replace(r, copies={"n2": Copy(state=LOADED, since=NOW)}) if r else None)
    await node.control.register(Registration("big", size_hint_bytes=fits_n2))  # n2's copy serves it already
    assert node.peers.loads == [("n2", "big")] and not list(node.cache.entries("big"))
