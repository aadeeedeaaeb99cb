from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from placement.policy import (
    PlacementConfig,
    active_failures,
    choose_copy,
    choose_load_target,
    load_exclusions,
    should_give_up,
)
from placement.types import LOADED, LOADING, CopyView, FailureView, ModelView, NodeView

NOW = 100_000.0
GB = 1 << 30


def node(iid: str, *, cap: int = 10 * GB, used: int = 0, **kw: Any) -> NodeView:
    return NodeView(instance_id=iid, endpoint=f"{iid}:8033", capacity_bytes=cap, used_bytes=used, **kw)


def full(iid: str, *, idle_s: float | None, **kw: Any) -> NodeView:
    """A full node whose least recently used model has been idle `idle_s` (None: nothing loaded)."""
    return node(iid, used=10 * GB, lru_time_s=None if idle_s is None else NOW - idle_s, **kw)


def picks(nodes: list[NodeView], *, size: int = GB, draws: int = 400, **kw: Any) -> Counter[str | None]:
    rng = random.Random(7)
    return Counter(choose_load_target(nodes, size_bytes=size, now=NOW, rng=rng, **kw) for _ in range(draws))


# -- choose_load_target: one table, each row a rule -------------------------------------------------

CASES: list[tuple[str, list[NodeView], set[str | None]]] = [
    ("free space beats an old cache", [full("old", idle_s=1e6), node("free", used=8 * GB)], {"free"}),
    ("more free space first", [node("a", used=0), node("b", used=5 * GB)], {"a"}),
    ("near-equal free space is spread", [node("a", used=0), node("b", used=1 * GB)], {"a", "b"}),
    ("too little free is not near-equal", [node("a", used=0), node("b", used=3 * GB)], {"a"}),
    ("fewer loads in progress", [node("a", loads_in_progress=2), node("b", used=GB // 2)], {"b"}),
    ("all full: oldest cache age", [full("new", idle_s=60), full("old", idle_s=3600)], {"old"}),
    ("all full: near-equal ages spread", [full("a", idle_s=3600), full("b", idle_s=3300)], {"a", "b"}),
    ("ages within the slack spread", [full("a", idle_s=40), full("b", idle_s=15)], {"a", "b"}),
    ("full with only loads ranks last", [full("loading", idle_s=None), full("x", idle_s=600)], {"x"}),
    ("only a full node with loads", [full("loading", idle_s=None)], {"loading"}),
    ("shutting down never", [node("a", shutting_down=True), full("b", idle_s=1)], {"b"}),
    ("capacity too small never", [node("small", cap=GB // 2), full("b", idle_s=1)], {"b"}),
    ("busy rate dropped", [node("busy", request_rate=50.0), node("calm", request_rate=10.0)], {"calm"}),
    ("busy inflight dropped", [node("busy", inflight=30), node("calm", inflight=4)], {"calm"}),
    ("idle noise is not busy", [node("a", request_rate=1.5, inflight=2), node("b")], {"a", "b"}),
    ("nothing eligible", [node("s", shutting_down=True), node("tiny", cap=1)], {None}),
    ("no nodes", [], {None}),
]


@pytest.mark.parametrize(("nodes", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_choose_load_target_rules(nodes: list[NodeView], expected: set[str | None]) -> None:
    assert set(picks(nodes)) == expected


def test_excluded_nodes_never_chosen() -> None:
    nodes = [node("a"), node("b"), full("c", idle_s=1e6)]
    assert set(picks(nodes, exclude={"a"})) == {"b"}
    assert set(picks(nodes, exclude=frozenset({"a", "b"}))) == {"c"}
    assert set(picks(nodes, exclude=["a", "b", "c"])) == {None}


def test_model_exactly_filling_free_space_counts_as_fitting() -> None:
    assert set(picks([node("exact", used=9 * GB), full("old", idle_s=1e6)], size=GB)) == {"exact"}


def test_seeded_rng_is_deterministic_and_order_independent() -> None:
    nodes = [node(f"n{i}") for i in range(8)]

    def run(ns: list[NodeView]) -> list[str | None]:
        rng = random.Random(42)
        return [choose_load_target(ns, size_bytes=GB, now=NOW, rng=rng) for _ in range(50)]

    assert run(nodes) == run(nodes) == run(list(reversed(nodes)))
    assert len(set(run(nodes))) > 1


def test_near_equal_nodes_share_the_load_evenly() -> None:
    counts = picks([node(f"n{i}", used=i * 100_000_000) for i in range(4)], draws=8000)
    assert set(counts) == {"n0", "n1", "n2", "n3"}
    assert all(1600 < c < 2400 for c in counts.values()), counts


def test_config_tunes_the_shortlist() -> None:
    nodes = [node("a", used=0), node("b", used=1 * GB)]
    assert set(picks(nodes, config=PlacementConfig(near_equal_free_ratio=1.0))) == {"a"}


@pytest.mark.parametrize(
    "bad", [{"near_equal_free_ratio": 0.0}, {"busy_factor": 0.5}, {"max_tried": 0}, {"busy_inflight_slack": -1}]
)
def test_config_rejects_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PlacementConfig(**bad)


def random_node(rng: random.Random, i: int) -> NodeView:
    cap = rng.choice([GB, 4 * GB, 10 * GB])
    return node(
        f"n{i}",
        cap=cap,
        used=rng.randint(0, cap),
        lru_time_s=rng.choice([None, NOW - rng.uniform(0, 7200), NOW + 5]),  # + clock skew
        request_rate=rng.choice([0.0, rng.uniform(0, 500)]),
        inflight=rng.randint(0, 40),
        loads_in_progress=rng.randint(0, 3),
        shutting_down=rng.random() < 0.2,
    )


def test_property_never_ineligible_and_none_only_when_nothing_eligible() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        nodes = [random_node(rng, i) for i in range(rng.randint(0, 12))]
        exclude = {n.instance_id for n in nodes if rng.random() < 0.2}
        size = rng.choice([1, GB // 2, 2 * GB, 8 * GB, 20 * GB])
        eligible = {
            n.instance_id
            for n in nodes
            if not n.shutting_down and n.instance_id not in exclude and n.capacity_bytes >= size
        }
        got = choose_load_target(iter(nodes), size_bytes=size, now=NOW, rng=rng, exclude=exclude)
        assert (got is None) == (not eligible)
        assert got is None or got in eligible
        fitting = {n.instance_id for n in nodes if n.instance_id in eligible and n.free_bytes >= size}
        assert not fitting or got in fitting  # free space always wins over eviction



def test_a_model_for_one_runtime_goes_only_to_nodes_running_it() -> None:
    nodes = [node("onnx", runtime="onnxruntime"), node("triton", used=9 * GB, runtime="triton"), node("old")]
    assert picks(nodes, runtime="triton") == Counter({"triton": 400})  # though it has the least room
    assert set(picks(nodes, runtime="onnxruntime")) == {"onnx"}
    assert set(picks(nodes)) == {"onnx", "old"}  # any runtime: the most free space, as ever
    assert picks(nodes, runtime="tensorrt") == Counter({None: 400})


# -- failures ------------------------------------------------------------------------------------

CFG = PlacementConfig(failure_expiry_s=900.0, max_failures=3, max_tried=5)


def model(*failures: tuple[str, float, str]) -> ModelView:
    return ModelView("m", GB, failures=tuple(FailureView(i, NOW - ago, msg) for i, ago, msg in failures))


def test_failures_expire() -> None:
    m = model(("old", 901, "x"), ("edge", 900, "x"), ("fresh", 899, "oom"), ("skewed", -5, "y"))
    assert [f.instance_id for f in active_failures(m, NOW, CFG)] == ["fresh", "skewed"]
    assert load_exclusions(m, NOW, CFG) == {"fresh", "skewed"}
    assert load_exclusions(m, NOW + 10_000, CFG) == frozenset()


def test_default_expiry_is_fifteen_minutes() -> None:
    assert load_exclusions(model(("n1", 14 * 60, "x")), NOW) == {"n1"}
    assert load_exclusions(model(("n1", 16 * 60, "x")), NOW) == frozenset()


def test_give_up_after_three_distinct_failures_names_model_nodes_and_last_error() -> None:
    m = model(("n1", 300, "timeout"), ("n3", 10, "CUDA out of memory"), ("n2", 100, "bad file"))
    msg = should_give_up(m, (), NOW, CFG)
    assert msg is not None
    assert msg.startswith("model 'm' failed to load on 3 nodes (n1, n2, n3); last error on n3: CUDA out of memory")
    assert "retried in 600s" in msg
    assert "iteration" not in msg


def test_repeated_failures_on_one_node_count_once() -> None:
    assert should_give_up(model(("n1", 30, "a"), ("n1", 20, "b"), ("n2", 10, "c")), (), NOW, CFG) is None


def test_expired_failures_do_not_count() -> None:
    m = model(("n1", 3600, "a"), ("n2", 10, "b"), ("n3", 5, "c"))
    assert should_give_up(m, (), NOW, CFG) is None


def test_give_up_after_five_tried_nodes() -> None:
    assert should_give_up(model(), ["a", "b", "c", "d"], NOW, CFG) is None
    msg = should_give_up(model(("e", 5, "disk full")), ["a", "b", "c", "d", "a"], NOW, CFG)
    assert (
        msg == "model 'm' could not be served by any of the 5 nodes tried (a, b, c, d, e); last error on e: disk full"
    )
    assert should_give_up(model(), ("a", "b", "c", "d", "e"), NOW, CFG) == (
        "model 'm' could not be served by any of the 5 nodes tried (a, b, c, d, e)"
    )


def test_long_node_lists_are_abbreviated() -> None:
    msg = should_give_up(model(), [f"n{i}" for i in range(20)], NOW, CFG)
    assert msg is not None and msg.count(", ") == 8 and "+12 more" in msg


# -- choose_copy ---------------------------------------------------------------------------------


def copies(*spec: tuple[str, str, float]) -> tuple[CopyView, ...]:
    return tuple(CopyView(i, state, since) for i, state, since in spec)


LIVE = {i: node(i) for i in "abcd"} | {"busy": node("busy", inflight=5), "down": node("down", shutting_down=True)}

COPY_CASES: list[tuple[str, tuple[CopyView, ...], Mapping[str, int], set[str], str | None]] = [
    ("loaded before loading", copies(("a", LOADING, 1), ("b", LOADED, 9)), {}, set(), "b"),
    ("fewest local in flight", copies(("a", LOADED, 1), ("b", LOADED, 9)), {"a": 2}, set(), "b"),
    ("published inflight counts", copies(("busy", LOADED, 1), ("a", LOADED, 9)), {"a": 4}, set(), "a"),
    ("local + published summed", copies(("busy", LOADED, 1), ("a", LOADED, 9)), {"a": 6}, set(), "busy"),
    ("loaded even if busier", copies(("busy", LOADED, 9), ("a", LOADING, 1)), {}, set(), "busy"),
    ("tie: oldest copy", copies(("a", LOADED, 9), ("b", LOADED, 3), ("c", LOADED, 5)), {}, set(), "b"),
    ("oldest loading copy", copies(("a", LOADING, 9), ("b", LOADING, 3)), {}, set(), "b"),
    ("dead node never", copies(("gone", LOADED, 1), ("a", LOADED, 9)), {"a": 50}, set(), "a"),
    ("shutting down never", copies(("down", LOADED, 1), ("a", LOADED, 9)), {}, set(), "a"),
    ("excluded never", copies(("a", LOADED, 1), ("b", LOADING, 9)), {}, {"a"}, "b"),
    ("none usable", copies(("gone", LOADED, 1), ("down", LOADED, 1), ("a", LOADED, 1)), {}, {"a"}, None),
    ("no copies", (), {}, set(), None),
]


@pytest.mark.parametrize(
    ("cs", "outstanding", "exclude", "expected"), [c[1:] for c in COPY_CASES], ids=[c[0] for c in COPY_CASES]
)
def test_choose_copy_rules(
    cs: tuple[CopyView, ...], outstanding: Mapping[str, int], exclude: set[str], expected: str | None
) -> None:
    assert choose_copy(cs, nodes=LIVE, local_outstanding=outstanding, exclude=exclude, rng=random.Random(0)) == expected


def test_choose_copy_prefers_a_copy_holding_the_version_asked_for() -> None:
    cs = (CopyView("a", LOADED, 1, ("1",)), CopyView("b", LOADING, 9, ("2",)), CopyView("c", LOADED, 5, ("1", "2")))
    pick = {version: choose_copy(cs, nodes=LIVE, local_outstanding={"c": 3}, exclude=(), rng=random.Random(0),
                                 version=version) for version in ("", "1", "2", "3")}
    # Holding the version outranks being loaded and being idle; where none holds it, the usual rules decide.
    assert pick == {"": "a", "1": "a", "2": "c", "3": "a"}


def test_choose_copy_spreads_exact_ties_with_rng() -> None:
    cs = copies(("a", LOADED, 5), ("b", LOADED, 5), ("c", LOADED, 5), ("d", LOADED, 1), ("busy", LOADED, 5))
    busy_d = {"d": 1}
    rng = random.Random(3)
    counts = Counter(choose_copy(cs, nodes=LIVE, local_outstanding=busy_d, exclude=(), rng=rng) for _ in range(3000))
    assert set(counts) == {"a", "b", "c"}
    assert all(800 < c < 1200 for c in counts.values()), counts


class RecordingNodes(Mapping[str, NodeView]):
    """A mesh of many nodes that records which ones routing looks at."""

    def __init__(self, size: int) -> None:
        self.nodes = {f"n{i}": node(f"n{i}") for i in range(size)}
        self.looked_at: list[str] = []

    def __getitem__(self, key: str) -> NodeView:
        self.looked_at.append(key)
        return self.nodes[key]

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("choose_copy must not scan the mesh")

    def __len__(self) -> int:
        raise AssertionError("choose_copy must not scan the mesh")


def test_choose_copy_only_looks_at_the_copies() -> None:
    mesh = RecordingNodes(10_000)
    cs = copies(("n5", LOADED, 2), ("n9", LOADED, 1), ("n7", LOADING, 0))
    assert choose_copy(cs, nodes=mesh, local_outstanding={}, exclude=frozenset(), rng=random.Random(0)) == "n9"
    assert mesh.looked_at == ["n5", "n9", "n7"]
