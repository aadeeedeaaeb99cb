"""Router.route against in-memory fakes of the node it runs in, the mesh's shared state and its peers."""


from __future__ import annotations

import grpc
import pytest

from placement.policy import PlacementConfig
from placement.types import LOADED, LOADING, CopyView, FailureView, NodeView
from router.errors import GaveUp, MeshError, NoPlacement, NotHere, OutOfTime, PeerError
from router.hop import MAX_HOPS, Hop, Mode
from tests.unit.router.fakes import (
    GB,
    ME,
    MODEL,
    NOW,
    TRACE,
    LoadFailed,
    ModelNotFound,
    World,
    loaded,
    node,
    small,
    unavailable,
)

# -- a forwarded request is served where it was sent, never forwarded again -------------------------


async def test_copy_request_without_a_copy_or_claim_here_is_not_here() -> None:
    w = World([small(ME), node("n1")], copies=[loaded("n1")])
    with pytest.raises(NotHere, match=f"'{MODEL}' is not loaded on node {ME}") as caught:
        await w.route(Hop(1, ("n0",), Mode.COPY, TRACE))
    assert caught.value.retry_elsewhere and caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert (w.local.calls, w.peers.calls, w.mesh.claims) == ([], [], [])


@pytest.mark.parametrize("state", [LOADING, LOADED])
async def test_copy_request_claimed_here_is_served_even_before_the_load_starts(state: str) -> None:
    # The sender saw the claim for this node in the mesh before this node's cache started loading.
    w = World([small(ME), node("n1")], copies=[loaded("n1"), CopyView(ME, state, NOW)])
    assert await w.route(Hop(1, ("n0",), Mode.COPY)) == ("served", ME)
    assert (w.local.guards, w.peers.calls, w.mesh.claims) == ([False], [], [])


async def test_copy_request_with_a_local_copy_is_served() -> None:
    w = World([small(ME), node("n1")], copies=[loaded("n1")])
    w.local.copies.add((MODEL, ""))
    assert await w.route(Hop(1, ("n0",), Mode.COPY)) == ("served", ME)
    assert w.peers.calls == []


@pytest.mark.parametrize(("hop", "churn_guard"), [
    (Hop(1, ("n0",), Mode.LOAD), True),  # another node could load it: do not flush this node's hot set for it
    (Hop(1, ("n0",), Mode.LOAD_LAST), False),  # the last node that can take it: load even if that evicts
    (Hop(MAX_HOPS, ("n0", "n1"), Mode.ANY), False),
], ids=["load", "load-last", "any-at-max-hops"])
async def test_load_request_or_too_many_hops_is_served_here(hop: Hop, churn_guard: bool) -> None:
    w = World([small(ME), node("n1")], copies=[loaded("n1")])
    assert await w.route(hop) == ("served", ME)
    assert (w.local.guards, w.peers.calls, w.mesh.claims) == ([churn_guard], [], [])


async def test_forwarded_request_failing_here_is_not_forwarded_again() -> None:
    w = World([small(ME), node("n1")], copies=[loaded("n1")])
    w.local.errors = [LoadFailed("out of memory")]
    with pytest.raises(LoadFailed):
        await w.route(Hop(1, ("n0",), Mode.LOAD))
    assert (w.peers.calls, w.mesh.claims) == ([], [])


# -- client requests (mode ANY) ---------------------------------------------------------------------


async def test_model_unknown_to_the_mesh_is_left_to_the_node_to_report() -> None:
    w = World([node(ME), node("n1")], registered=False)
    w.local.errors = [ModelNotFound(f"model '{MODEL}' not found")]
    with pytest.raises(ModelNotFound):
        await w.route()
    assert (len(w.local.calls), w.peers.calls, w.mesh.claims) == (1, [], [])


async def test_forwarded_to_the_copy_with_fewest_outstanding_carrying_trace_and_tried() -> None:
    # n1 is the oldest copy and would win on a tie: only the outstanding counts make n2 the choice.
    w = World([small(ME), node("n1"), node("n2"), node("n3")],
              copies=[loaded("n1", NOW - 300), loaded("n2", NOW - 200), loaded("n3", NOW - 100)])
    w.peers.counts = {"n1": 3, "n2": 1, "n3": 2}
    assert await w.route(Hop(0, ("x",), Mode.ANY, TRACE), budget_s=5.0) == ("served", "n2")
    [call] = w.peers.calls
    assert call.node == "n2"
    assert call.hop == Hop(1, (ME, "x"), Mode.COPY, TRACE)
    assert call.budget_s is not None and 0 < call.budget_s <= 5.0
    assert w.mesh.claims == [] and w.local.calls == []


async def test_no_budget_is_passed_down_as_none() -> None:
    w = World([small(ME), node("n1")], copies=[loaded("n1")])
    await w.route(budget_s=None)
    assert [c.budget_s for c in w.peers.calls] == [None]


async def test_budget_passed_down_shrinks_with_time_spent() -> None:
    w = World([small(ME), node("n1"), node("n2")], copies=[loaded("n1", NOW - 200), loaded("n2")])
    w.peers.fail(["n1"])
    w.peers.delay_s = 0.05
    assert await w.route(budget_s=5.0) == ("served", "n2")
    first, second = (c.budget_s for c in w.peers.calls)
    assert first is not None and second is not None
    assert 5.0 - 0.01 < first <= 5.0
    assert second <= first - 0.05


@pytest.mark.parametrize("error", [NotHere("model evicted"), unavailable("n1", "not here: x"), unavailable("n1")],
                         ids=["not-here", "peer-not-here", "peer-unavailable"])
async def test_failed_copy_moves_on_to_the_next_copy(error: MeshError) -> None:
    w = World([small(ME), node("n1"), node("n2"), node("n3")],
              copies=[loaded("n1", NOW - 300), loaded("n2", NOW - 200)])
    w.peers.script["n1"] = [error]
    assert await w.route() == ("served", "n2")
    assert [(c.node, c.hop.mode, c.hop.tried, c.hop.propagated) for c in w.peers.calls] == [
        ("n1", Mode.COPY, (ME,), TRACE), ("n2", Mode.COPY, (ME, "n1"), TRACE)]
    assert w.mesh.claims == []


async def test_all_copies_failing_loads_elsewhere_excluding_them() -> None:
    w = World([small(ME), node("n1"), node("n2"), node("n3"), node("n4", free=2 * GB)],
              copies=[loaded("n1", NOW - 300), loaded("n2", NOW - 200)])
    w.peers.fail(["n1", "n2"])
    assert await w.route() == ("served", "n3")
    [(name, target, excluded)] = w.mesh.claims
    assert (name, target) == (MODEL, "n3") and {"n1", "n2"} <= excluded
    assert [(c.node, c.hop.mode) for c in w.peers.calls] == [("n1", Mode.COPY), ("n2", Mode.COPY), ("n3", Mode.LOAD)]
    assert w.peers.calls[-1].hop == Hop(1, (ME, "n1", "n2"), Mode.LOAD, TRACE)
    assert w.copy_states()["n3"] == LOADING


@pytest.mark.parametrize(("other", "mode"), [(node("n2", free=2 * GB), Mode.LOAD), (small("n2"), Mode.LOAD_LAST)],
                         ids=["another-node-could-load", "only-candidate"])
async def test_no_copy_loads_where_placement_chose_and_records_the_claim(other: NodeView, mode: Mode) -> None:
    w = World([small(ME), node("n1"), other])  # n1 has the most room
    assert await w.route() == ("served", "n1")
    assert w.mesh.claims == [(MODEL, "n1", frozenset())]
    assert w.peers.calls[0].hop == Hop(1, (ME,), mode, TRACE)
    assert w.copy_states() == {"n1": LOADING}


async def test_guarded_load_refused_moves_on_and_the_last_candidate_loads_unguarded() -> None:
    w = World([small(ME), node("n1"), node("n2", free=2 * GB)])
    w.peers.script["n1"] = [PeerError(grpc.StatusCode.RESOURCE_EXHAUSTED, "node n1: would evict hot models",
                                      retry_elsewhere=True)]
    assert await w.route() == ("served", "n2")
    assert [(c.node, c.hop.mode) for c in w.peers.calls] == [("n1", Mode.LOAD), ("n2", Mode.LOAD_LAST)]
    assert [t for _, t, _ in w.mesh.claims] == ["n1", "n2"]


async def test_claim_race_lost_goes_to_the_first_claimer_as_copy() -> None:
    w = World([small(ME), node("n1"), small("n2")])
    w.mesh.claimed_first = "n2"  # another node's miss claimed n2 just before ours
    assert await w.route() == ("served", "n2")
    assert [t for _, t, _ in w.mesh.claims] == ["n1"]
    assert [(c.node, c.hop.mode) for c in w.peers.calls] == [("n2", Mode.COPY)]
    assert w.copy_states() == {"n2": LOADING}  # one load serves both requests


async def test_claim_race_lost_to_this_node_is_served_here() -> None:
    w = World([small(ME), node("n1"), node("n2", free=2 * GB)])
    w.mesh.claimed_first = ME
    assert await w.route() == ("served", ME)
    assert (w.local.guards, w.peers.calls) == ([False], [])  # the claimer loads it; this is a copy request


async def test_placement_on_this_node_serves_here_and_a_load_failure_moves_on() -> None:
    # This node has by far the most free space: placement must pick it first.
    w = World([node(ME), node("n1", free=2 * GB)])
    w.local.errors = [LoadFailed(f"node {ME}: runtime crashed loading '{MODEL}'")]
    assert await w.route() == ("served", "n1")
    assert w.local.guards == [True]  # n1 could load it instead
    assert [t for _, t, _ in w.mesh.claims] == [ME, "n1"]
    assert ME in w.mesh.claims[1][2]
    assert [(c.node, c.hop.mode, c.hop.tried) for c in w.peers.calls] == [("n1", Mode.LOAD_LAST, (ME,))]


async def test_placement_on_this_node_as_the_only_candidate_loads_unguarded() -> None:
    w = World([node(ME), small("n1")])
    assert await w.route() == ("served", ME)
    assert (w.local.guards, w.peers.calls) == ([False], [])
    assert w.copy_states() == {ME: LOADING}


@pytest.mark.parametrize("where", ["peer", "here"])
async def test_non_retryable_error_is_raised_at_once(where: str) -> None:
    error = (PeerError(grpc.StatusCode.INVALID_ARGUMENT, "node n1: bad input shape", retry_elsewhere=False)
             if where == "peer" else ModelNotFound(f"version 7 of '{MODEL}' not found"))
    holder = "n1" if where == "peer" else ME
    w = World([node(ME), node("n1"), node("n2")], copies=[loaded(holder, NOW - 300), loaded("n2")])
    w.peers.script["n1"] = [error]
    w.local.errors = [error]
    with pytest.raises(MeshError) as caught:
        await w.route()
    assert caught.value is error
    assert len(w.peers.calls) + len(w.local.calls) == 1
    assert w.mesh.claims == []


# -- giving up ----------------------------------------------------------------------------------------


def many(count: int) -> list[NodeView]:
    return [small(ME), *(node(f"n{i}") for i in range(count))]


async def test_attempts_are_bounded_and_gave_up_names_model_and_last_cause() -> None:
    w = World(many(8), max_attempts=3, placement=PlacementConfig(max_tried=50))
    for i in range(8):
        w.peers.fail([f"n{i}"], f"reset by peer #{i}")
    with pytest.raises(GaveUp) as caught:
        await w.route()
    assert len(w.peers.calls) == 3
    last = w.peers.calls[-1].node
    message = str(caught.value)
    assert MODEL in message and f"node {last}: reset by peer #{last[1:]}" in message
    assert "iteration" not in message and "exhausted" not in message
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_too_many_nodes_tried_gives_up_naming_the_last_cause() -> None:
    # Default bounds: placement's max_tried (5) stops the walk before max_attempts (6).
    w = World(many(8))
    for i in range(8):
        w.peers.fail([f"n{i}"], f"reset by peer #{i}")
    with pytest.raises(GaveUp) as caught:
        await w.route()
    assert len(w.peers.calls) == 5
    last = w.peers.calls[-1].node
    message = str(caught.value)
    assert MODEL in message and f"reset by peer #{last[1:]}" in message


async def test_model_failing_to_load_on_many_nodes_gives_up_without_trying() -> None:
    failures = [FailureView(f"n{i}", NOW - 60 + i, f"onnx error #{i}") for i in range(3)]
    w = World(many(6), failures=failures)
    with pytest.raises(GaveUp) as caught:
        await w.route()
    assert MODEL in str(caught.value) and "onnx error #2" in str(caught.value)
    assert (w.peers.calls, w.mesh.claims) == ([], [])


async def test_failures_expire_on_the_injected_clock() -> None:
    failures = [FailureView(f"n{i}", NOW - 60, "onnx error") for i in range(2)]  # fewer than max_failures
    nodes = [small(ME), node("n0"), node("n1"), node("n2", free=GB)]
    w = World(nodes, failures=failures)
    assert await w.route() == ("served", "n2")  # the failed nodes are excluded from placement for now
    assert {"n0", "n1"} <= w.mesh.claims[0][2]
    w = World(nodes, failures=failures)
    w.clock.now += PlacementConfig().failure_expiry_s
    assert await w.route() in {("served", "n0"), ("served", "n1")}  # expired: back, with the most room


async def test_every_candidate_failed_gives_up_with_the_last_error_not_no_placement() -> None:
    w = World([small(ME), node("n1")])
    w.peers.fail(["n1"], "disk full")
    with pytest.raises(GaveUp, match=f"'{MODEL}'.*node n1: disk full"):
        await w.route()


@pytest.mark.parametrize(("size", "nodes", "why"), [
    (100 * GB, [node(ME), node("n1"), node("n2")], f"largest: {10 * GB} bytes"),
    (GB, [small(ME), node("n1", shutting_down=True), node("n2", shutting_down=True)], "shutting down"),
], ids=["bigger-than-any-node", "no-room-now"])
async def test_no_node_able_to_take_the_model_is_no_placement_naming_model_and_size(
        size: int, nodes: list[NodeView], why: str) -> None:
    w = World(nodes, size=size)
    with pytest.raises(NoPlacement) as caught:
        await w.route()
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = str(caught.value)
    assert f"'{MODEL}'" in message and f"{size} bytes" in message and why in message
    assert (w.peers.calls, w.mesh.claims, w.local.calls) == ([], [], [])


# -- which nodes are never chosen -----------------------------------------------------------------------


async def test_suspect_copy_is_skipped() -> None:
    w = World([small(ME), node("n1"), node("n2")], copies=[loaded("n1", NOW - 300), loaded("n2")])
    w.peers.suspected = {"n1"}
    assert await w.route() == ("served", "n2")
    assert w.peers.nodes_called == ["n2"]


async def test_suspect_node_is_not_loaded_on() -> None:
    w = World([small(ME), node("n1"), node("n2", free=GB)])  # n1 has the most room, but is suspect
    w.peers.suspected = {"n1"}
    assert await w.route() == ("served", "n2")
    assert w.mesh.claims == [(MODEL, "n2", frozenset({"n1"}))]


async def test_copy_on_a_node_gone_from_the_mesh_is_never_chosen() -> None:
    # "gone"'s lease expired; the janitor has not removed its copy from the model record yet.
    w = World([small(ME), node("n2")], copies=[loaded("gone", NOW - 900), CopyView("n2", LOADING, NOW)])
    assert await w.route() == ("served", "n2")
    assert w.peers.calls[0].hop.mode is Mode.COPY


async def test_only_copy_on_a_gone_node_loads_elsewhere() -> None:
    w = World([small(ME), node("n1")], copies=[loaded("gone")])
    assert await w.route() == ("served", "n1")
    assert [(c.node, c.hop.mode) for c in w.peers.calls] == [("n1", Mode.LOAD_LAST)]


async def test_claim_returning_a_gone_node_is_not_forwarded_to() -> None:
    w = World([small(ME), node("n1")], copies=[loaded("gone")])
    w.mesh.check_liveness = False  # the claim trusts the stale record
    assert await w.route() == ("served", "n1")
    assert [t for _, t, _ in w.mesh.claims] == ["n1", "n1"]
    assert "gone" in w.mesh.claims[1][2]
    assert w.peers.nodes_called == ["n1"]


# -- deadline -------------------------------------------------------------------------------------------


async def test_no_attempt_after_the_budget_is_spent() -> None:
    w = World(many(10), copies=[loaded(f"n{i}", NOW - i) for i in range(10)],
              max_attempts=10, placement=PlacementConfig(max_tried=50))
    w.peers.fail([f"n{i}" for i in range(10)], "slow and broken")
    w.peers.delay_s = 0.06
    with pytest.raises(OutOfTime) as caught:
        await w.route(budget_s=0.1)
    assert 1 <= len(w.peers.calls) <= 2  # at 0 and ~0.06 s; a third would start after the deadline
    assert all(c.budget_s is not None and 0 < c.budget_s <= 0.1 for c in w.peers.calls)
    assert MODEL in str(caught.value) and "deadline" in str(caught.value)


async def test_spent_budget_forwards_nothing() -> None:
    w = World([small(ME), node("n1")], copies=[loaded("n1")])
    with pytest.raises(OutOfTime) as caught:
        await w.route(budget_s=0.0)
    assert w.peers.calls == []
    assert MODEL in str(caught.value) and "deadline" in str(caught.value)
