"""The router under overload: a copy at its bound sends the request to another copy; when every copy is at
its bound the request fails at once with Overloaded naming the model and its copies, and no load is claimed."""

from __future__ import annotations

import grpc
import pytest

from placement.types import LOADING, CopyView
from router.errors import OVERLOADED_PREFIX, GaveUp, Overloaded
from router.hop import Hop, Mode
from router.router import MAX_ATTEMPTS
from tests.unit.router.fakes import ME, MODEL, NOW, TRACE, Req, World, loaded, node, overloaded, small, unavailable


def here(waiting: int = 32) -> Overloaded:
    """The dataplane's refusal on its hit path: this node's copy is at its bound."""
    return Overloaded(f"model '{MODEL}' has {waiting} requests waiting on node {ME}, its limit")


async def test_a_client_request_refused_by_the_copy_here_goes_to_another_copy() -> None:
    w = World([node(ME), node("n1"), node("n2")], copies=[loaded(ME), loaded("n1")])
    assert await w.router.route(Req(), Hop(propagated=TRACE), 30.0, here()) == ("served", "n1")
    assert w.peers.nodes_called == ["n1"]
    assert w.peers.calls[0].hop.tried == (ME,)  # the copy it was sent to knows this one refused
    assert (w.local.calls, w.mesh.claims) == ([], [])


async def test_when_every_copy_is_at_its_bound_the_request_fails_at_once_naming_the_model_and_no_load_starts() -> None:
    # n2 and n3 have room: without the overload rule the router would claim a load there.
    w = World([node(ME), node("n1"), node("n2"), node("n3")], copies=[loaded(ME), loaded("n1")])
    w.peers.script["n1"] = [overloaded("n1")]
    with pytest.raises(Overloaded) as caught:
        await w.router.route(Req(), Hop(), 30.0, here())
    error = caught.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_elsewhere
    message = str(error)
    assert message.startswith(OVERLOADED_PREFIX)
    assert f"model '{MODEL}': every copy ({ME}, n1) is at its limit of waiting requests" in message
    assert "node n1: model" in message  # the last refusal, for the operator
    assert (w.peers.nodes_called, w.local.calls, w.mesh.claims) == (["n1"], [], [])


async def test_copies_elsewhere_that_all_refuse_fail_the_request_without_a_claim() -> None:
    w = World([small(ME), node("n1"), node("n2"), node("n3")], copies=[loaded("n1"), CopyView("n2", LOADING, NOW)])
    w.peers.script.update({"n1": [overloaded("n1")], "n2": [overloaded("n2")]})
    with pytest.raises(Overloaded, match=rf"model '{MODEL}': every copy \(n1, n2\)"):
        await w.route()
    assert sorted(w.peers.nodes_called) == ["n1", "n2"] and w.mesh.claims == []


async def test_the_local_copy_refusing_on_the_miss_path_counts_as_overloaded() -> None:
    # The copy here is still loading and has as many requests waiting for its load as it may.
    w = World([node(ME), node("n1")], copies=[CopyView(ME, LOADING, NOW)])
    w.local.errors = [Overloaded(f"model '{MODEL}' has 32 requests waiting for its load on this node")]
    with pytest.raises(Overloaded, match=rf"every copy \({ME}\).*waiting for its load"):
        await w.route()
    assert len(w.local.calls) == 1 and (w.peers.calls, w.mesh.claims) == ([], [])


async def test_a_copy_the_view_does_not_list_yet_still_counts_as_one_at_its_bound() -> None:
    # The copy here loaded before its record reached the view: its refusal proves it exists.
    w = World([node(ME), node("n1"), node("n2")], copies=[loaded("n1")])
    w.peers.script["n1"] = [overloaded("n1")]
    with pytest.raises(Overloaded, match=rf"every copy \({ME}, n1\)"):
        await w.router.route(Req(), Hop(), 30.0, here())
    assert w.mesh.claims == []


async def test_a_request_a_peer_sent_for_the_copy_here_goes_back_to_that_peer() -> None:
    w = World([node(ME), node("n1")], copies=[loaded(ME), loaded("n1")])
    refusal = here()
    with pytest.raises(Overloaded) as caught:
        await w.router.route(Req(), Hop(1, ("n1",), Mode.COPY, TRACE), 30.0, refusal)
    assert caught.value is refusal  # with this copy's figures; the peer tries its other copies
    assert (w.local.calls, w.peers.calls, w.mesh.claims) == ([], [], [])


async def test_an_overloaded_copy_and_a_failed_one_leave_the_failed_ones_replacement_to_placement() -> None:
    # Not every copy is busy: n2 failed. Replacing a failed copy is what the router does anyway.
    w = World([small(ME), node("n1"), node("n2"), node("n3")], copies=[loaded("n1"), loaded("n2")])
    w.peers.script.update({"n1": [overloaded("n1")], "n2": [unavailable("n2")]})
    assert await w.route() == ("served", "n3")
    assert [c[1] for c in w.mesh.claims] == ["n3"]


async def test_more_busy_copies_than_attempts_still_answer_overloaded_not_gave_up() -> None:
    names = [f"n{i}" for i in range(MAX_ATTEMPTS + 2)]
    w = World([small(ME), *(node(n) for n in names)], copies=[loaded(n) for n in names])
    for n in names:
        w.peers.script[n] = [overloaded(n)]
    with pytest.raises(Overloaded, match=rf"model '{MODEL}': every copy") as caught:
        await w.route()
    assert not isinstance(caught.value, GaveUp)
    assert len(w.peers.calls) == MAX_ATTEMPTS and w.mesh.claims == []


async def test_an_unregistered_model_refused_here_is_not_served_past_the_bound() -> None:
    w = World([node(ME)], registered=False)
    with pytest.raises(Overloaded, match=rf"every copy \({ME}\)"):
        await w.router.route(Req(), Hop(), 30.0, here())
    assert w.local.calls == []
