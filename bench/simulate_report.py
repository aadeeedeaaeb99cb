"""`python -m bench.simulate_report`: the mesh against its baselines on every synthetic workload.

For each workload and each capacity (a share of the model bytes the trace requests, spread over the
nodes) it runs the mesh as configured by default, the same mesh on an always-fresh view of the node
records (what publication staleness costs), plain placement (no churn guard, no reuse protection:
what per-node fragmentation costs), and the baselines. Then the effect of extra copies and
proactive loads on two workloads that trigger them. Prints the tables; writes bench/out/
simulate_report.json and one hit ratio plot per workload plus an overview of mesh minus LRU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from placement.copies import CopyConfig
from placement.simstats import Result
from placement.simulate import MeshSim, SimConfig, compare
from placement.simulate_cli import Sweep, plot_sweep
from placement.workloads import Trace, generate

WORKLOADS = ("zipf:s=0.8", "zipf:s=1.0", "zipf:s=1.2", "shifting", "weekly", "bursts")
FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.4)
OUT = Path(__file__).parent / "out"
NODE_COUNTS = (3, 10)  # the same workloads at 10% on smaller and larger meshes
# (what it shows, workload, capacity share): a hot model wanting copies in an overcommitted mesh, and
# a mesh with room, where repeatedly used models get a second copy and cooled ones lose it.
COPY_CASES = (
    ("hot models, overcommitted", "shifting:s=1.2,rate=300,every=120,step=20,requests=200000", 0.1),
    ("repeated use, room to spare", "zipf:rate=2,requests=30000", 1.5),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small traces (a smoke test; the numbers mean little)")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    overview: dict[str, list[tuple[float, float]]] = {}
    print(_header())
    for spec in WORKLOADS:
        trace = generate(_spec(spec, args.quick))
        sweep: Sweep = []
        for fraction in FRACTIONS:
            config = _config(trace, fraction, args.nodes)
            started = time.perf_counter()
            results = compare(trace, config)
            elapsed = time.perf_counter() - started
            results["mesh_fresh_view"] = MeshSim(trace, dataclasses.replace(config, publish_interval_s=0.0)).run()
            plain = dataclasses.replace(config, churn_guard_s=0.0, protect_fraction=0.0)
            results["plain_placement"] = MeshSim(trace, plain).run()
            sweep.append((fraction, results))
            row = _row(spec, fraction, results, elapsed) | {"nodes": args.nodes}
            rows.append(row)
            print(_format(row), flush=True)
        plot_sweep(sweep, f"{spec} ({args.nodes} nodes)", OUT)
        overview[spec] = [(f, rs["mesh"].hit_ratio - rs["global_lru"].hit_ratio) for f, rs in sweep]
    _plot_overview(overview, OUT / "mesh_minus_lru.png")
    print("\nother mesh sizes at 10%: mesh / global LRU hit ratio")
    for spec in WORKLOADS:
        trace = generate(_spec(spec, args.quick))
        cells = [compare(trace, _config(trace, 0.1, n)) for n in NODE_COUNTS]
        sizes = "  ".join(f"{n} nodes {r['mesh'].hit_ratio:.4f} / {r['global_lru'].hit_ratio:.4f}"
                          for n, r in zip(NODE_COUNTS, cells, strict=True))
        print(f"  {spec:12} {sizes}")
        rows.extend(_row(spec, 0.1, r, 0.0) | {"nodes": n} for n, r in zip(NODE_COUNTS, cells, strict=True))
    copies = [_copies_case(label, spec, fraction, args.nodes, args.quick) for label, spec, fraction in COPY_CASES]
    print("\nextra copies and proactive loads (CopyConfig defaults):")
    for case in copies:
        print(f"  {case['case']}: {case['workload']} at {case['capacity']:.0%}")
        for name in ("without", "with"):
            r = case[name]
            print(f"    {name:8} hit {r['hit_ratio']:.4f}  loads {r['loads']:6}  extra {r['extra_loads']:5}  "
                  f"removed {r['removals']:5}  duplicates {r['duplicate_loads']}")
    (OUT / "simulate_report.json").write_text(json.dumps({"rows": rows, "copies": copies}, indent=1))
    below = [r for r in rows if r["mesh_minus_lru"] < 0]
    print(f"\nmesh >= global LRU in {len(rows) - len(below)} of {len(rows)} cases; "
          f"duplicate loads: {sum(r['duplicate_loads'] for r in rows)}; plots and JSON in {OUT}")
    for r in below:
        print(f"  below: {r['workload']} at {r['capacity']:.0%}: {r['mesh_minus_lru']:+.4f}")


def _spec(spec: str, quick: bool) -> str:
    return spec + ("," if ":" in spec else ":") + "requests=5000,models=1000" if quick else spec


def _config(trace: Trace, fraction: float, nodes: int) -> SimConfig:
    """Defaults, with the mesh's capacity a share of the trace's model bytes."""
    return SimConfig(nodes=nodes, capacity_bytes=max(1, int(trace.distinct_bytes() * fraction / nodes)))


def _row(spec: str, fraction: float, results: dict[str, Result], elapsed: float) -> dict[str, Any]:
    mesh = results["mesh"]
    return {
        "workload": spec, "capacity": fraction,
        **{name: round(r.hit_ratio, 4) for name, r in results.items()},
        "mesh_minus_lru": round(mesh.hit_ratio - results["global_lru"].hit_ratio, 4),
        "rejected": mesh.rejected, "duplicate_loads": mesh.duplicate_loads,
        "mesh_load_gb": round(mesh.load_bytes / 1e9, 1),
        "lru_load_gb": round(results["global_lru"].load_bytes / 1e9, 1),
        "mesh_latency_ms": round(mesh.as_dict()["latency_mean_ms"], 1),
        "lru_latency_ms": round(results["global_lru"].as_dict()["latency_mean_ms"], 1),
        "seconds_all_systems": round(elapsed, 2),
    }


_COLUMNS = (("workload", "{:12}", 12), ("capacity", "{:>6.0%}", 6), ("mesh", "{:>7.4f}", 7),
            ("mesh_fresh_view", "{:>7.4f}", 7), ("plain_placement", "{:>7.4f}", 7), ("global_lru", "{:>7.4f}", 7),
            ("random", "{:>7.4f}", 7), ("belady", "{:>7.4f}", 7), ("mesh_minus_lru", "{:>+8.4f}", 8),
            ("rejected", "{:>5}", 5), ("duplicate_loads", "{:>4}", 4), ("mesh_latency_ms", "{:>7.1f}", 7),
            ("lru_latency_ms", "{:>7.1f}", 7), ("seconds_all_systems", "{:>6.1f}", 6))
_TITLES = ("workload", "cap", "mesh", "fresh", "plain", "LRU", "random", "Belady", "mesh-LRU", "rej", "dup",
           "ms mesh", "ms LRU", "sec")


def _header() -> str:
    widths = [width for _, _, width in _COLUMNS]
    return " ".join([f"{_TITLES[0]:{widths[0]}}", *(f"{t:>{w}}" for t, w in zip(_TITLES[1:], widths[1:], strict=True))])


def _format(row: dict[str, Any]) -> str:
    return " ".join(fmt.format(row[key]) for key, fmt, _ in _COLUMNS)


def _copies_case(label: str, spec: str, fraction: float, nodes: int, quick: bool) -> dict[str, Any]:
    trace = generate(spec + (",requests=5000" if quick else ""))
    base = _config(trace, fraction, nodes)
    with_copies = dataclasses.replace(base, copies=CopyConfig(), proactive=True)
    return {
        "case": label, "workload": spec, "capacity": fraction,
        "without": MeshSim(trace, base).run().as_dict(), "with": MeshSim(trace, with_copies).run().as_dict(),
    }


def _plot_overview(overview: dict[str, list[tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for spec, points in overview.items():
        ax.plot([100 * f for f, _ in points], [100 * d for _, d in points], "o-", label=spec)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    xs = [100 * f for f in FRACTIONS]
    ax.set_xticks(xs, [f"{x:g}%" for x in xs])
    ax.set_xlabel("mesh capacity, share of the model bytes requested")
    ax.set_ylabel("mesh hit ratio minus global LRU's, points")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
