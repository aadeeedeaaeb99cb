"""Sequences: every node derives the same copy for a sequence (rendezvous over the model's copies), a start goes
to the first, a continuation to the first that holds it, and a sequence no copy holds is a clear error."""

from __future__ import annotations

import grpc
import pytest

from meshpb import pb
from router.errors import GaveUp, Overloaded
from router.hop import Mode
from router.sequences import SequenceFlags, SequenceLost, SequenceNotHere, rank, sequence_of
from tests.unit.router.fakes import CLIENT, ME, MODEL, Req, World, loaded, node, overloaded, unavailable

COPIES = ["n1", "n2", "n3", ME]


def world(copies: list[str] = COPIES) -> World:
    return World([node(n) for n in {*COPIES, ME}], copies=[loaded(n) for n in copies])


async def route(w: World, sequence: SequenceFlags) -> object:
    return await w.router.route(Req(), CLIENT, 30.0, sequence=sequence)


def not_here(n: str, sequence: SequenceFlags) -> SequenceNotHere:
    return SequenceNotHere(sequence, MODEL, n)


def test_the_order_is_the_same_on_every_node_and_spreads_sequences_over_copies() -> None:
    orders = {tuple(rank(SequenceFlags(i), COPIES)) for i in range(1, 200)}
    assert {order[0] for order in orders} == set(COPIES)  # each copy starts some sequences
    assert rank(SequenceFlags(7), COPIES) == rank(SequenceFlags(7), list(reversed(COPIES)))  # derivable anywhere
    # A new copy moves only the sequences it now ranks first for: the others keep their order among the old.
    for i in range(1, 50):
        old = rank(SequenceFlags(i), COPIES)
        assert [n for n in rank(SequenceFlags(i), [*COPIES, "n9"]) if n != "n9"] == old


@pytest.mark.parametrize(("parameters", "expected"), [
    ({}, None),
    ({"sequence_id": pb.InferParameter(int64_param=0)}, None),
    ({"sequence_id": pb.InferParameter(string_param="")}, None),
    ({"sequence_id": pb.InferParameter(int64_param=5), "sequence_start": pb.InferParameter(bool_param=True)},
     SequenceFlags(5, start=True)),
    ({"sequence_id": pb.InferParameter(string_param="abc"), "sequence_end": pb.InferParameter(bool_param=True)},
     SequenceFlags("abc", end=True)),
])
def test_a_requests_sequence_is_read_from_its_parameters_as_triton_does(
    parameters: dict[str, pb.InferParameter], expected: SequenceFlags | None,
) -> None:
    assert sequence_of(pb.ModelInferRequest(parameters=parameters).parameters) == expected


async def test_a_start_goes_to_the_first_copy_in_the_sequences_order_from_any_node() -> None:
    for i in range(1, 30):
        start = SequenceFlags(i, start=True)
        w = world()
        first = rank(start, COPIES)[0]
        assert await route(w, start) == ("served", first)
        if first != ME:
            assert w.peers.calls[0].hop.mode is Mode.COPY  # the copy serves it, never loads or forwards it
        assert w.mesh.claims == []


async def test_a_continuation_tries_the_copies_in_order_until_one_holds_it() -> None:
    sequence = SequenceFlags(11)
    order = [n for n in rank(sequence, COPIES) if n != ME]
    w = world([n for n in COPIES if n != ME])
    w.peers.script = {order[0]: [not_here(order[0], sequence)]}  # a copy added mid-sequence ranks first
    assert await route(w, sequence) == ("served", order[1])
    assert w.peers.nodes_called == order[:2]


async def test_a_sequence_no_copy_holds_is_lost_and_never_restarted_elsewhere() -> None:
    sequence = SequenceFlags(3)
    w = world([n for n in COPIES if n != ME])
    w.peers.script = {n: [not_here(n, sequence)] for n in COPIES}
    w.peers.script["n2"] = [unavailable("n2")]  # its node went away with the state
    with pytest.raises(SequenceLost) as caught:
        await route(w, sequence)
    message = str(caught.value)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and not caught.value.retry_elsewhere
    assert f"inference request for sequence 3 to model '{MODEL}' must specify the START flag" in message
    assert "lost its state" in message and w.mesh.claims == []


async def test_a_continuation_with_no_copy_left_is_lost_and_a_start_loads_one() -> None:
    with pytest.raises(SequenceLost):
        await route(world([]), SequenceFlags(4))
    w = world([])
    assert await route(w, SequenceFlags(4, start=True)) in {("served", n) for n in COPIES}
    assert len(w.mesh.claims) == 1  # placement chose where, as for any first request


async def test_a_busy_copy_holding_the_sequence_says_so_and_a_start_moves_on() -> None:
    sequence = SequenceFlags(9)
    first, second = [n for n in rank(sequence, COPIES) if n != ME][:2]
    w = world([n for n in COPIES if n != ME])
    w.peers.script = {first: [overloaded(first)]}
    with pytest.raises(Overloaded):
        await route(w, sequence)
    w = world([n for n in COPIES if n != ME])
    w.peers.script = {first: [overloaded(first)]}
    assert await route(w, SequenceFlags(9, start=True)) == ("served", second)


async def test_a_start_every_copy_refuses_gives_up_naming_the_last_cause() -> None:
    w = world([n for n in COPIES if n != ME])
    w.peers.fail(COPIES)
    with pytest.raises(GaveUp, match="could not start sequence 5"):
        await route(w, SequenceFlags(5, start=True))
