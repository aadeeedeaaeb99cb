from __future__ import annotations

import pytest

from router.hop import HOPS_KEY, MODE_KEY, TRIED_KEY, Hop, Mode, trace_context

TRACE = (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), ("tracestate", "vendor=x"))


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("tried", [(), ("a",), ("a", "b", "node-7")])
def test_metadata_round_trip(mode: Mode, tried: tuple[str, ...]) -> None:
    hop = Hop(hops=1, tried=tried, mode=mode, propagated=TRACE)
    assert Hop.from_metadata(hop.to_metadata()) == hop


def test_default_hop_round_trips_and_no_metadata_is_a_client_request() -> None:
    assert Hop.from_metadata(Hop().to_metadata()) == Hop()
    assert Hop.from_metadata(None) == Hop() == Hop.from_metadata([])
    assert Hop().mode is Mode.ANY


def test_to_metadata_is_plain_ascii_pairs() -> None:
    metadata = Hop(2, ("a", "b"), Mode.COPY, TRACE).to_metadata()
    assert metadata == ((HOPS_KEY, "2"), (TRIED_KEY, "a,b"), (MODE_KEY, "copy"), *TRACE)


@pytest.mark.parametrize(("wire", "mode"), [("any", Mode.ANY), ("copy", Mode.COPY), ("load", Mode.LOAD),
                                            ("load-last", Mode.LOAD_LAST)])
def test_mode_wire_values_are_stable(wire: str, mode: Mode) -> None:
    # Nodes of different versions share a mesh during a rolling upgrade: the wire values must not drift.
    assert Hop.from_metadata([(MODE_KEY, wire)]).mode is mode
    assert (MODE_KEY, wire) in Hop(mode=mode).to_metadata()


def test_forward_counts_the_hop_and_keeps_the_trace() -> None:
    hop = Hop(0, ("x",), Mode.ANY, TRACE)
    assert hop.forward(Mode.LOAD, ["me", "n1"]) == Hop(1, ("me", "n1"), Mode.LOAD, TRACE)
    assert hop.forward(Mode.COPY, iter(["me"])).forward(Mode.COPY, ()).hops == 2


def test_only_trace_keys_are_propagated() -> None:
    hop = Hop.from_metadata([("user-agent", "grpc-python"), ("grpc-timeout", "1S"), ("authorization", "secret"),
                             ("tracestate", "k=v"), ("traceparent", "00-ab-cd-01")])
    assert hop.propagated == (("tracestate", "k=v"), ("traceparent", "00-ab-cd-01"))
    assert (hop.hops, hop.tried, hop.mode) == (0, (), Mode.ANY)



def test_trace_context_keeps_only_the_trace_entries_as_text() -> None:
    metadata: list[tuple[str, str | bytes]] = [("authorization", "secret"), ("traceparent", b"00-ab-cd-01"),
                                               (HOPS_KEY, "2"), ("tracestate", "k=v")]
    assert trace_context(metadata) == (("traceparent", "00-ab-cd-01"), ("tracestate", "k=v"))
    assert trace_context(None) == ()


GARBAGE: list[tuple[str, list[tuple[str, str | bytes]], Hop]] = [
    ("hops not a number", [(HOPS_KEY, "abc")], Hop()),
    ("hops negative", [(HOPS_KEY, "-1")], Hop()),
    ("hops signed", [(HOPS_KEY, "+1")], Hop()),
    ("hops fractional", [(HOPS_KEY, "1.5")], Hop()),
    ("hops empty", [(HOPS_KEY, "")], Hop()),
    ("hops padded", [(HOPS_KEY, " 1")], Hop()),
    ("unknown mode", [(MODE_KEY, "teleport")], Hop()),
    ("mode is case sensitive", [(MODE_KEY, "LOAD")], Hop()),
    ("mode empty", [(MODE_KEY, "")], Hop()),
    ("empty tried entries dropped", [(TRIED_KEY, ",a,,b,")], Hop(tried=("a", "b"))),
    ("tried empty", [(TRIED_KEY, "")], Hop()),
    ("bytes values decoded", [(HOPS_KEY, b"2"), (TRIED_KEY, b"a,b"), (MODE_KEY, b"copy"), ("traceparent", b"00-x")],
     Hop(2, ("a", "b"), Mode.COPY, (("traceparent", "00-x"),))),
    ("undecodable bytes", [(HOPS_KEY, b"\xff1"), (MODE_KEY, b"\xfe"), (TRIED_KEY, b"a,\xff")],
     Hop(tried=("a", "\ufffd"))),
    ("repeated keys: last valid value wins", [(HOPS_KEY, "1"), (HOPS_KEY, "x"), (MODE_KEY, "load"), (MODE_KEY, "copy")],
     Hop(1, mode=Mode.COPY)),
]


@pytest.mark.parametrize(("metadata", "expected"), [g[1:] for g in GARBAGE], ids=[g[0] for g in GARBAGE])
def test_garbage_metadata_is_tolerated(metadata: list[tuple[str, str | bytes]], expected: Hop) -> None:
    assert Hop.from_metadata(metadata) == expected


@pytest.mark.parametrize("hops", ["²", "1" * 5000], ids=["superscript", "too-many-digits"])
def test_digit_like_hops_are_tolerated(hops: str) -> None:
    assert Hop.from_metadata([(HOPS_KEY, hops)]).hops == 0


def test_encoded_hop_round_trips_without_its_trace_context() -> None:
    hop = Hop(2, ("a", "node-1"), Mode.LOAD_LAST, (("traceparent", "00-x-y-01"),))
    assert Hop.decode(hop.encode(), hop.propagated) == hop
    assert Hop.decode(Hop().encode()) == Hop()


@pytest.mark.parametrize(("text", "expected"), [
    ("", Hop()), ("x|copy|a", Hop()), ("²|copy|", Hop()), ("9999|copy|a", Hop()), ("|||", Hop()),
    ("1|bogus|a", Hop(1, ("a",))),  # a valid count keeps its tried nodes; an unknown mode reads as ANY
])
def test_malformed_encoded_hops_read_as_safe_values(text: str, expected: Hop) -> None:
    assert Hop.decode(text) == expected
