"""Property-based tests of the hop (router.hop): whatever a client or a peer puts in the `meshserve_hop` parameter
or in gRPC metadata, reading it never fails, valid hops survive the wire unchanged, and a request is forwarded at
most MAX_HOPS times, so forged or corrupted hops can neither crash a node nor bounce a request around the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.errors import MeshError
from router.hop import HOPS_KEY, MAX_HOPS, MODE_KEY, PROPAGATED_KEYS, TRIED_KEY, Hop, Mode, trace_context
from tests.unit.router.fakes import World, loaded, node

pytestmark = pytest.mark.timeout(60)

# derandomize: the same examples on every run (CI is reproducible); database=None: no example database.
FUZZ = settings(deadline=1000, derandomize=True, database=None)

# The largest count decode accepts: three ASCII digits.
MAX_DECODED_HOPS = 999
MODE_VALUES = [m.value for m in Mode]

# Text that looks like a hop, or nearly: the separators, digit lookalikes, the mode names in any case.
hop_like_pieces = st.one_of(
    st.sampled_from(["|", ",", "0", "1", "2", "3", "999", "1000", "-1", "+1", " ", "²", "١", "\x00", "\ufffd",
                     *MODE_VALUES, "LOAD", "Copy", "node-1", "n0", ""]),
    st.text(max_size=4),
)
hop_texts = st.one_of(
    st.text(),
    st.lists(hop_like_pieces, max_size=8).map("".join),
    st.builds(lambda h, m, t: f"{h}|{m}|{t}", st.integers(-5, 10**6), st.sampled_from([*MODE_VALUES, "x", ""]),
              st.lists(st.text(max_size=6), max_size=4).map(",".join)),
)
tried_names = st.text(min_size=1, max_size=12).filter(lambda t: "," not in t)
valid_hops = st.builds(
    Hop,
    hops=st.integers(0, MAX_DECODED_HOPS),
    tried=st.lists(tried_names, max_size=5).map(tuple),
    mode=st.sampled_from(list(Mode)),
    propagated=st.lists(st.tuples(st.sampled_from(PROPAGATED_KEYS), st.text(max_size=20)), max_size=2).map(tuple),
)
metadata_keys = st.one_of(st.sampled_from([HOPS_KEY, TRIED_KEY, MODE_KEY, *PROPAGATED_KEYS, "user-agent",
                                           "grpc-timeout", "authorization"]), st.text(max_size=10))
metadata_values = st.one_of(st.text(max_size=20), st.binary(max_size=20), hop_like_pieces)
metadata = st.one_of(st.none(), st.lists(st.tuples(metadata_keys, metadata_values), max_size=8))


def assert_well_formed(hop: Hop) -> None:
    assert isinstance(hop.hops, int) and 0 <= hop.hops <= MAX_DECODED_HOPS
    assert isinstance(hop.mode, Mode)
    assert all(isinstance(t, str) and t and "," not in t for t in hop.tried)
    assert all(key in PROPAGATED_KEYS and isinstance(value, str) for key, value in hop.propagated)


@settings(FUZZ, max_examples=100)
@given(text=hop_texts, propagated=st.lists(st.tuples(st.sampled_from(PROPAGATED_KEYS), st.text()), max_size=2))
def test_decode_reads_any_text_as_a_well_formed_hop(text: str, propagated: list[tuple[str, str]]) -> None:
    hop = Hop.decode(text, tuple(propagated))
    assert_well_formed(hop)
    assert hop.propagated == tuple(propagated)  # the caller's trace context is kept whatever the text says
    count = text.partition("|")[0]
    if not (count.isascii() and count.isdigit() and len(count) <= 3):
        assert hop == Hop(propagated=tuple(propagated))  # the documented fallback: a fresh client request
    # Decoding is idempotent through the wire: what was read is re-sent and read back the same.
    assert Hop.decode(hop.encode(), hop.propagated) == hop


@settings(FUZZ, max_examples=80)
@given(hop=valid_hops)
def test_valid_hops_round_trip_through_the_parameter_and_metadata(hop: Hop) -> None:
    assert Hop.decode(hop.encode(), hop.propagated) == hop
    assert Hop.from_metadata(hop.to_metadata()) == hop


@settings(FUZZ, max_examples=80)
@given(entries=metadata)
def test_from_metadata_reads_any_metadata_as_a_well_formed_hop(
        entries: list[tuple[str, str | bytes]] | None) -> None:
    hop = Hop.from_metadata(entries)
    assert_well_formed(hop)
    assert [k for k, _ in hop.propagated] == [k for k, _ in entries or () if k in PROPAGATED_KEYS]
    assert hop.propagated == trace_context(entries)
    assert Hop.from_metadata(hop.to_metadata()) == hop


@settings(FUZZ, max_examples=80)
@given(text=hop_texts, modes=st.lists(st.sampled_from(list(Mode)), min_size=MAX_HOPS + 2, max_size=MAX_HOPS + 2))
def test_no_hop_read_from_the_wire_is_forwarded_more_than_max_hops_times(text: str, modes: list[Mode]) -> None:
    """Even senders that forwarded with mode ANY (no node does) could not make a request go round forever."""
    hop = Hop.decode(text)
    forwards = 0
    for mode in modes:
        if hop.mode is not Mode.ANY or hop.hops >= MAX_HOPS:  # the router's rule: served where it arrived
            break
        hop = Hop.decode(hop.forward(mode, [*hop.tried, f"n{forwards}"]).encode())
        forwards += 1
    assert forwards <= MAX_HOPS


def _route(world: World, hop: Hop) -> None:
    # NotHere for a COPY hop to a node without the copy, GaveUp: answers, not failures.
    with contextlib.suppress(MeshError):
        asyncio.run(world.route(hop))


def _world() -> World:
    # A copy only elsewhere, so a client request (mode ANY) is forwarded.
    return World([node("me"), node("n1"), node("n2")], copies=[loaded("n1"), loaded("n2")])


@settings(FUZZ, max_examples=50)
@given(text=hop_texts)
def test_the_router_forwards_a_request_at_most_once_per_node_whatever_its_hop_says(text: str) -> None:
    hop = Hop.decode(text)
    world = _world()
    _route(world, hop)
    if hop.mode is not Mode.ANY or hop.hops >= MAX_HOPS:
        assert world.peers.calls == []
    for call in world.peers.calls:
        assert call.hop.hops == hop.hops + 1 and call.hop.mode is not Mode.ANY
        # The peer reads the hop from the parameter it was sent in, and serves the request itself.
        peer = _world()
        _route(peer, Hop.decode(call.hop.encode(), call.hop.propagated))
        assert peer.peers.calls == []
