"""A node whose runtime is down routes, but placement neither serves a copy there nor loads one there."""

from __future__ import annotations

import random

from placement.policy import choose_copy, choose_load_target
from placement.types import LOADED, CopyView, NodeView

GB = 1 << 30


def node(iid: str, *, down: bool = False, used: int = 0) -> NodeView:
    return NodeView(iid, f"{iid}:1", capacity_bytes=10 * GB, used_bytes=used, runtime="triton", runtime_down=down)


def test_a_copy_on_a_node_whose_runtime_is_down_is_not_chosen() -> None:
    nodes = {"a": node("a", down=True), "b": node("b")}
    copies = [CopyView("a", LOADED, 1.0), CopyView("b", LOADED, 2.0)]  # a's is older: it would be chosen
    assert choose_copy(copies, nodes=nodes, local_outstanding={}, exclude=set(), rng=random.Random(1)) == "b"
    assert choose_copy(copies[:1], nodes=nodes, local_outstanding={}, exclude=set(), rng=random.Random(1)) is None


def test_no_load_goes_to_a_node_whose_runtime_is_down() -> None:
    nodes = [node("a", down=True), node("b", used=9 * GB)]  # a has all the room, b almost none
    for seed in range(20):
        assert choose_load_target(nodes, size_bytes=GB // 2, now=0.0, rng=random.Random(seed),
                                  runtime="triton") == "b"
    assert choose_load_target(nodes[:1], size_bytes=GB // 2, now=0.0, rng=random.Random(1), runtime="triton") is None
