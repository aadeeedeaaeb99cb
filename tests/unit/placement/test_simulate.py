from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from placement.baselines import run_belady, run_lru, run_random
from placement.copies import CopyConfig
from placement.simstats import LatencyModel
from placement.simulate import MeshSim, SimConfig, compare
from placement.simulate_cli import Progress, main
from placement.workloads import NAMES, Trace, generate

INSTANT = LatencyModel(hit_s=0.001, load_fixed_s=0.0, load_bytes_per_s=1e30)
# The mesh as a plain LRU: no guard, no reuse protection, a fresh view, instant loads.
PLAIN: dict[str, Any] = {"churn_guard_s": 0.0, "protect_fraction": 0.0, "publish_interval_s": 0.0, "latency": INSTANT}


def trace(*events: tuple[float, str], size: int = 1) -> Trace:
    names = list(dict.fromkeys(name for _, name in events))
    return Trace([t for t, _ in events], [names.index(n) for _, n in events], names, [size] * len(names))


def seq(names: str) -> Trace:
    return trace(*((float(i), n) for i, n in enumerate(names)))


def mesh(tr: Trace, **kw: Any) -> MeshSim:
    sim = MeshSim(tr, SimConfig(**({"nodes": 1, "capacity_bytes": 2} | kw)))
    sim.run()
    return sim


# -- answers known by hand ----------------------------------------------------------------------


@pytest.mark.parametrize(("names", "lru_hits", "belady_hits"), [
    ("ABCABC", 0, 2),  # a loop one larger than the cache: LRU always evicts the next one needed
    ("ABACAB", 2, 2),
    ("ABCBACB", 1, 2),
    ("AAAA", 3, 3),
])
def test_small_traces_known_by_hand(names: str, lru_hits: int, belady_hits: int) -> None:
    tr = seq(names)
    assert run_lru(tr, 2, INSTANT).hits == lru_hits
    assert run_belady(tr, 2, INSTANT).hits == belady_hits
    assert mesh(tr, **PLAIN).result.hits == lru_hits


def test_one_plain_node_is_exactly_an_lru() -> None:
    tr = generate("zipf:models=500,requests=20000")
    capacity = tr.distinct_bytes() // 10
    lru = run_lru(tr, capacity, INSTANT)
    sim = mesh(tr, capacity_bytes=capacity, **PLAIN).result
    assert (sim.hits, sim.loads, sim.evictions, sim.load_bytes) == (lru.hits, lru.loads, lru.evictions, lru.load_bytes)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("share", [0.02, 0.1, 0.3])
def test_belady_is_never_below_lru(seed: int, share: float) -> None:
    tr = generate(f"zipf:s=0.9,models=300,requests=5000,seed={seed}")
    capacity = int(tr.distinct_bytes() * share)
    assert run_belady(tr, capacity, INSTANT).hits >= run_lru(tr, capacity, INSTANT).hits


def test_a_model_larger_than_a_node_is_rejected_everywhere() -> None:
    tr = trace((0.0, "big"), (1.0, "big"), size=10)
    results = compare(tr, SimConfig(nodes=2, capacity_bytes=5, latency=INSTANT))
    assert results["mesh"].rejected == 2 and results["random"].rejected == 2
    assert results["global_lru"].hits == 1  # one cache of 10 bytes holds it


# -- the churn guard and reuse protection -------------------------------------------------------


def test_the_guard_refuses_and_the_request_is_rejected_when_no_node_can_make_room() -> None:
    sim = mesh(trace((0.0, "A"), (1.0, "B"), (20.0, "B")), capacity_bytes=1, **(PLAIN | {"churn_guard_s": 10.0}))
    assert (sim.result.rejected, sim.result.loads, sim.result.evictions) == (1, 2, 1)


def test_a_refusing_node_is_excluded_and_placement_asked_again() -> None:
    # The view is published once, at t=0, when both nodes are empty: placement cannot tell them apart
    # and must learn from the refusals that A's node holds a model in use.
    tr = trace((0.0, "A"), (0.5, "B"), (30.0, "A"), (31.0, "C"), (32.0, "A"))
    for seed in range(8):
        r = mesh(tr, nodes=2, capacity_bytes=1, seed=seed,
                 **(PLAIN | {"churn_guard_s": 10.0, "publish_interval_s": 1000.0})).result
        assert (r.hits, r.loads, r.evictions, r.rejected) == (2, 3, 1, 0)


def test_reuse_protection_keeps_the_hot_set_through_cold_bursts() -> None:
    tr = generate("bursts:models=2000,hot=100,requests=30000,every=60,burst=100")
    capacity = tr.distinct_bytes() // 20
    config = SimConfig(nodes=3, capacity_bytes=capacity // 3)
    protected = MeshSim(tr, config).run()
    assert protected.hit_ratio > run_lru(tr, capacity, config.latency).hit_ratio + 0.01
    assert protected.rejected == 0


# -- loads in progress, latency, invariants -----------------------------------------------------


def test_a_request_during_a_load_waits_for_it_and_starts_no_other() -> None:
    latency = LatencyModel(hit_s=0.002, load_fixed_s=1.0, load_bytes_per_s=1e30)
    r = mesh(trace((0.0, "A"), (0.4, "A"), (5.0, "A")), **(PLAIN | {"latency": latency})).result
    assert (r.loads, r.hits, r.waited) == (1, 2, 1)
    assert r.latencies == pytest.approx([1.002, 0.602, 0.002])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("publish", [0.0, 1.0])
def test_no_duplicate_loads_and_capacity_respected(name: str, publish: float) -> None:
    tr = generate(f"{name}:models=2000,requests=20000,rate=50")
    sim = MeshSim(tr, SimConfig(nodes=4, capacity_bytes=tr.distinct_bytes() // 40, publish_interval_s=publish,
                                copies=CopyConfig(), proactive=True))
    r = sim.run()
    assert r.duplicate_loads == 0
    assert r.requests == len(tr) == r.hits + r.loads - r.extra_loads + r.rejected
    nodes = sim._nodes.values()  # the simulated nodes' own state, read only
    assert all(0 <= n.used <= n.capacity and n.used == sum(c.size for c in n.lru.values()) for n in nodes)
    assert all(n.reused == sum(c.size for c in n.lru.values() if c.reused) for n in nodes)


def test_hot_model_gets_an_extra_copy_removed_once_cool() -> None:
    hot = [(i / 100, "hot") for i in range(6000)]  # 100 req/s for a minute
    tail = [(60.0 + i, f"m{i % 5}") for i in range(900)]  # then other models, slowly, for 15 min
    config = CopyConfig(cool_after_s=60.0, availability_min_free_fraction=1.0)  # no second copies
    sim = MeshSim(trace(*hot, *tail), SimConfig(nodes=4, capacity_bytes=100, copies=config, plan_every_s=10.0))
    r = sim.run()
    assert r.extra_loads == 1 and r.removals == 1 and r.duplicate_loads == 0


def test_random_baseline_is_seeded() -> None:
    tr = generate("zipf:models=300,requests=3000")
    assert run_random(tr, 3, tr.distinct_bytes() // 30, INSTANT, 1).hits == \
        run_random(tr, 3, tr.distinct_bytes() // 30, INSTANT, 1).hits


@pytest.mark.parametrize("bad", [{"nodes": 0}, {"churn_guard_s": -1.0}, {"protect_fraction": 1.5},
                                 {"plan_every_s": 0.0}])
def test_config_rejects_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimConfig(**({"nodes": 1, "capacity_bytes": 1} | bad))


# -- the command ----------------------------------------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_json_has_the_mesh_and_every_baseline() -> None:
    code, out, _ = run_cli("--nodes", "3", "--capacity", "5%", "--workload", "zipf:models=300,requests=3000", "--json")
    report = json.loads(out)
    assert code == 0
    for figures in (report, *report["baselines"].values()):
        assert {"hit_ratio", "loads", "evictions", "load_bytes", "latency_mean_ms"} <= figures.keys()
    assert set(report["baselines"]) == {"global_lru", "random", "belady"}
    assert report["setup"]["nodes"] == 3 and report["duplicate_loads"] == 0


def test_cli_reads_a_trace_and_writes_plots(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("time,model,size\n" + "".join(f"{i},m{i % 7},{1000 + i % 7}\n" for i in range(200)))
    code, out, _ = run_cli("--nodes", "2", "--capacity", "2000", "--trace", str(csv), "--plot", str(tmp_path / "p"))
    assert code == 0
    assert "global_lru" in out and "belady" in out
    assert (tmp_path / "p" / "hit_ratio_t.csv.png").stat().st_size > 1000


@pytest.mark.parametrize(("argv", "message"), [
    (["--capacity", "lots", "--workload", "zipf"], "--capacity 'lots' is neither a size nor a percentage"),
    (["--capacity", "1000", "--workload", "zipf:s=x"], "s must be a number"),
    (["--capacity", "1000", "--trace", "/nonexistent.csv"], "No such file"),
])
def test_cli_errors_exit_2_with_a_message(argv: list[str], message: str) -> None:
    code, out, err = run_cli("--nodes", "2", *argv)
    assert code == 2 and message in err and out == ""


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal() -> None:
    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = Progress(stream, 100, width=10)
        bar.update(50)
        bar.update(100)
    assert tty.getvalue() == "\rmesh [#####.....] 50/100\rmesh [##########] 100/100\n"
    assert pipe.getvalue() == ""
