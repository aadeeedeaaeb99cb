from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from typing import Any

import pytest

from placement.copies import CopyConfig, CopyLoad, copy_limit, plan_copy_changes, plan_proactive_loads
from placement.types import LOADED, CopyView, FailureView, ModelView, NodeView

NOW = 100_000.0
GB = 1 << 30
MIN = 60.0
CFG = CopyConfig()  # hot 33.3 req/s, cool 8.3 req/s, cool after 20 min, repeat span 7 min, idle 40 min


def mesh(n: int = 9, *, used: int = 0, me_down: bool = False) -> dict[str, NodeView]:
    nodes = {f"n{i}": NodeView(f"n{i}", f"n{i}:1", 10 * GB, used) for i in range(n)}
    nodes["n0"] = dataclasses.replace(nodes["n0"], shutting_down=me_down)
    return nodes


def load(**kw: Any) -> CopyLoad:
    """A model used once a moment ago, one copy, cold, unless told otherwise."""
    base: dict[str, Any] = {"name": "m", "rate_per_s": 0.0, "inflight": 0, "copies": 1, "last_used": NOW - 1,
                            "first_used": NOW - 1}
    return CopyLoad(**(base | kw))


def decide(*loads: CopyLoad, nodes: dict[str, NodeView] | None = None, **cfg: Any) -> tuple[Any, Any]:
    plan = plan_copy_changes(loads, nodes=mesh() if nodes is None else nodes, me="n0", now=NOW,
                             config=dataclasses.replace(CFG, **cfg))
    return plan.add, plan.remove_here


FULL = mesh(used=10 * GB)  # no room for availability copies
IDLE = {"here_last_used": NOW - 30 * MIN}  # this node's copy served nothing for 30 min

# (rule, load, nodes, expected add, expected remove_here)
CASES: list[tuple[str, CopyLoad, dict[str, NodeView] | None, tuple[Any, ...], tuple[str, ...]]] = [
    ("cold single copy: nothing", load(), None, (), ()),
    ("hot rate: ceil(rate/threshold) copies", load(rate_per_s=100.0), None, (("m", 2),), ()),
    ("hot rate counts the copies it has", load(rate_per_s=100.0, copies=2), None, (("m", 1),), ()),
    ("hot in flight", load(inflight=40), None, (("m", 2),), ()),
    ("hot copies evict, so they come in a full mesh", load(rate_per_s=100.0), FULL, (("m", 2),), ()),
    ("bounded by a third of the nodes", load(rate_per_s=1000.0), None, (("m", 2),), ()),
    ("a small mesh still gets 2", load(rate_per_s=1000.0), mesh(3), (("m", 1),), ()),
    ("never more than the live nodes", load(rate_per_s=1000.0), mesh(1), (), ()),
    ("min_copies first", load(min_copies=3), None, (("m", 2),), ()),
    ("min_copies above the load bound", load(min_copies=5, copies=4), None, (("m", 1),), ()),
    ("used continuously for 10 min: second copy", load(first_used=NOW - 10 * MIN), None, (("m", 1),), ()),
    ("used twice 8 min apart: second copy", load(first_used=NOW - 9 * MIN, last_used=NOW - MIN), None, (("m", 1),), ()),
    ("span too short: no second copy", load(first_used=NOW - 5 * MIN), None, (), ()),
    ("idle too long: no second copy", load(first_used=NOW - 90 * MIN, last_used=NOW - 45 * MIN), None, (), ()),
    ("no room: no second copy", load(first_used=NOW - 10 * MIN), FULL, (), ()),
    ("cool extra copy goes", load(copies=2, **IDLE), None, (), ("m",)),
    ("never the last copy", load(copies=1, last_used=NOW - 9e4, first_used=NOW - 9e4), None, (), ()),
    ("never below min_copies", load(copies=2, min_copies=2, **IDLE), None, (), ()),
    ("never pinned", load(copies=2, pinned=True, **IDLE), None, (), ()),
    ("a copy still serving stays", load(copies=2, here_last_used=NOW - 5 * MIN), None, (), ()),
    ("the rate still needs it (cool threshold)", load(copies=2, rate_per_s=10.0, **IDLE), None, (), ()),
    ("below the cool threshold it goes", load(copies=3, rate_per_s=10.0, **IDLE), None, (), ("m",)),
    ("repeatedly used model keeps its second copy", load(copies=2, first_used=NOW - 20 * MIN, **IDLE), FULL, (), ()),
]


@pytest.mark.parametrize(("one", "nodes", "add", "remove"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_copy_rules(one: CopyLoad, nodes: dict[str, NodeView] | None, add: tuple[Any, ...],
                    remove: tuple[str, ...]) -> None:
    assert decide(one, nodes=nodes) == (add, remove)


def test_a_draining_node_decides_nothing() -> None:
    hot = load(rate_per_s=100.0)
    assert decide(hot, nodes=mesh(me_down=True)) == ((), ())
    assert plan_copy_changes([hot], nodes=mesh(), me="gone", now=NOW).add == ()


def test_changes_per_call_are_bounded_most_urgent_first() -> None:
    loads = [
        load(name="avail", first_used=NOW - 10 * MIN),
        load(name="hot", rate_per_s=100.0),
        load(name="min", min_copies=3),
        load(name="cool", copies=2, **IDLE),
    ]
    assert decide(*loads, max_changes_per_call=3) == ((("min", 2), ("hot", 1)), ())
    assert decide(*loads, max_changes_per_call=5) == ((("min", 2), ("hot", 2), ("avail", 1)), ())
    assert decide(*loads, max_changes_per_call=6) == ((("min", 2), ("hot", 2), ("avail", 1)), ("cool",))


def test_longest_idle_removed_first() -> None:
    loads = [load(name="a", copies=2, here_last_used=NOW - 25 * MIN), load(name="b", copies=2, **IDLE)]
    assert decide(*loads, max_changes_per_call=1) == ((), ("b",))


def test_copy_limit() -> None:
    assert [copy_limit(n, 1) for n in (1, 2, 3, 6, 9, 30, 100)] == [1, 2, 2, 2, 3, 8, 8]
    assert copy_limit(3, 5) == 3 and copy_limit(30, 10) == 10


def random_load(rng: random.Random) -> CopyLoad:
    last = NOW - rng.choice([0.0, 60.0, 600.0, 3000.0])
    return load(
        rate_per_s=rng.choice([0.0, 0.001, 5.0, 20.0, 50.0, 200.0]), inflight=rng.choice([0, 5, 40]),
        copies=rng.randint(1, 5), last_used=last, first_used=last - rng.choice([0.0, 300.0, 900.0]),
        min_copies=rng.choice([1, 1, 2]), pinned=rng.random() < 0.1,
        here_last_used=last - rng.choice([0.0, 1800.0]),
    )


def test_property_a_removed_copy_is_never_added_back() -> None:
    rng = random.Random(5)
    for _ in range(5000):
        one = random_load(rng)
        nodes = mesh(rng.choice([2, 5, 9]), used=rng.choice([0, 10 * GB]))
        add, remove = decide(one, nodes=nodes)
        assert not (add and remove)
        if remove:
            assert one.copies > max(1, one.min_copies) and not one.pinned
            # The copy is gone: the same view must not want it back.
            assert decide(dataclasses.replace(one, copies=one.copies - 1), nodes=nodes)[0] == ()
        for _, n in add:
            assert one.copies + n <= len(nodes)


@pytest.mark.parametrize("bad", [{"cool_rate_per_copy": 40.0}, {"max_copies": 0}, {"max_copies_fraction": 2.0},
                                 {"repeat_min_span_s": 3000.0}, {"cool_after_s": -1.0}])
def test_config_rejects_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CopyConfig(**bad)


# -- proactive loads ----------------------------------------------------------------------------


def model(name: str, *, used: float | None, size: int = GB, **kw: Any) -> ModelView:
    return ModelView(name, size, last_used=used, **kw)


def proactive(candidates: Any, nodes: dict[str, NodeView], **cfg: Any) -> tuple[tuple[str, str], ...]:
    return plan_proactive_loads(candidates, nodes=nodes, now=NOW, rng=random.Random(1),
                                config=dataclasses.replace(CFG, **cfg))


def test_recent_first_then_never_used_and_only_models_without_a_copy() -> None:
    candidates = [
        model("never", used=None),
        model("old", used=NOW - 60 * MIN),  # beyond the 30 min window
        model("recent", used=NOW - 5),
        model("earlier", used=NOW - 10 * MIN),
        model("has-copy", used=NOW, copies=(CopyView("n1", LOADED, 0.0),)),
    ]
    picks = proactive(candidates, mesh(3))
    assert [m for m, _ in picks] == ["recent", "earlier", "never"]


def test_never_evicts_and_keeps_the_reserve() -> None:
    nodes = {"a": NodeView("a", "a", 10 * GB, 8 * GB), "b": NodeView("b", "b", 10 * GB, 10 * GB)}
    picks = proactive([model(f"m{i}", used=NOW - i) for i in range(5)], nodes)
    # a has 2 GB free and keeps 1 GB (10%): one 1 GB model fits; b is full.
    assert picks == (("m0", "a"),)


def test_bytes_of_each_pick_count_before_the_next() -> None:
    nodes = mesh(2)
    picks = proactive([model(f"m{i}", used=NOW - i, size=4 * GB) for i in range(5)], nodes)
    assert sorted(node for _, node in picks) == ["n0", "n0", "n1", "n1"]  # 2 x 4 GB each, 1 GB reserve


def test_bounded_per_call_and_failed_nodes_avoided() -> None:
    failed = (FailureView("n0", NOW - 10, "boom"),)
    picks = proactive([model(f"m{i}", used=NOW - i, size=1, failures=failed) for i in range(40)], mesh(2))
    assert len(picks) == CFG.max_proactive_per_call
    assert {node for _, node in picks} == {"n1"}


def test_a_full_mesh_does_not_even_read_the_candidates() -> None:
    def unread() -> Iterator[ModelView]:
        raise AssertionError("read")
        yield  # pragma: no cover

    assert proactive(unread(), mesh(3, used=10 * GB)) == ()


def test_shutting_down_nodes_get_nothing() -> None:
    assert {n for _, n in proactive([model("m", used=NOW)], mesh(2, me_down=True))} == {"n1"}
