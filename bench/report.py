"""Medians over rounds, ratios against the issue's goals, the printed tables, and every bench's command line."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Json = dict[str, Any]

SERVERS = ("floor", "node")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    phase: str  # the round's entry it is read from: "latency" or "throughput"
    field: str
    # Goal on node/floor: ("<=", 1.10) means the node may be at most 10% above the floor.
    goal: tuple[str, float] | None = None


METRICS = (
    Metric("p50_ms", "c=1 p50 latency, ms", "latency", "p50_ms", ("<=", 1.10)),
    Metric("p99_ms", "c=1 p99 latency, ms", "latency", "p99_ms"),
    Metric("rps", "c=16 throughput, req/s", "throughput", "rps", (">=", 0.90)),
    Metric("c16_p50_ms", "c=16 p50 latency, ms", "throughput", "p50_ms"),
    Metric("server_cpu_us", "c=16 server CPU, us/req", "throughput", "server_cpu_us_per_req"),
)


# For the benches that compare paths through servers (mesh_hop, triton_sidecar); "hop" is the CPU of the
# last process on a path, the one that forwards, and is absent for a path without one.
PATH_FIELDS = (  # key, label, phase, field
    ("p50_ms", "c=1 p50 latency, ms", "latency", "p50_ms"),
    ("p99_ms", "c=1 p99 latency, ms", "latency", "p99_ms"),
    ("rps", "c=16 throughput, req/s", "throughput", "rps"),
    ("c16_p50_ms", "c=16 p50 latency, ms", "throughput", "p50_ms"),
    ("server_cpu_us", "c=16 CPU of the path's servers, us/req", "throughput", "server_cpu_us_per_req"),
    ("hop_cpu_us", "c=16 CPU of the hop process, us/req", "throughput", "hop_cpu_us_per_req"),
)


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def summarize_paths(rounds: list[Json], paths: Iterable[str]) -> Json:
    """Per PATH_FIELDS key, each path's spread over rounds (a path without the figure is left out)."""
    return {key: {p: spread([r[p][phase][field] for r in rounds]) for p in paths
                  if rounds[0][p][phase][field] is not None} for key, _, phase, field in PATH_FIELDS}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: each server's median and min-max over rounds, the ratio of medians, the verdict."""
    summary: dict[str, Any] = {}
    for metric in METRICS:
        row: dict[str, Any] = {
            server: spread([r[server][metric.phase][metric.field] for r in rounds]) for server in SERVERS
        }
        floor = row["floor"]["median"]
        row["ratio"] = row["node"]["median"] / floor if floor else None
        if metric.goal is not None:
            op, bound = metric.goal
            row["goal"] = f"{op} {bound:.2f}x"
            ratio = row["ratio"]
            row["pass"] = ratio is not None and (ratio <= bound if op == "<=" else ratio >= bound)
        summary[metric.key] = row
    return summary


def cell(values: dict[str, Any]) -> str:
    """A spread as `median (min-max)`, or the one value of a one-round run."""
    fmt = "{:.0f}" if values["median"] >= 100 else "{:.3f}"
    if len(values["values"]) == 1:
        return fmt.format(values["median"])
    return f"{fmt.format(values['median'])} ({fmt.format(values['min'])}-{fmt.format(values['max'])})"


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as lines of left-aligned columns, the first row the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_report(result: dict[str, Any]) -> str:
    config = result["config"]
    summary = result["summary"]
    header = ("metric", "floor", "node", "node/floor", "goal", "")
    rows = [header]
    for metric in METRICS:
        row = summary[metric.key]
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        verdict = ("PASS" if row["pass"] else "MISS") if "pass" in row else ""
        goal = row.get("goal", "")
        rows.append((metric.label, cell(row["floor"]), cell(row["node"]), ratio, goal, verdict))
    lines = [
        f"meshserve node vs floor: {config['model_mb']:.2f} MB MLP, {config['rounds']} interleaved rounds, "
        f"c=1 {config['requests']} requests, c=16 {config['seconds']:g} s each, "
        f"{'pinned: servers on CPU 0, load generator on CPU 1' if config['pin'] else 'shared CPUs'}",
        f"medians (min-max over rounds); 1-min load average {config['loadavg_1m_before']:.1f} before, "
        f"{config['loadavg_1m_after']:.1f} after",
        "",
    ]
    lines += table(rows)
    rss = result["rss_mb"]
    lines.append(f"RSS after the rounds: floor {rss['floor']:.0f} MB, node {rss['node']:.0f} MB")
    cold = result["cold_start"]
    lines += [
        "",
        f"cold start, 1 MB model, {len(cold['node_total_s'])} fresh names: "
        f"RepositoryModelLoad -> first answer {_ms(cold['node_total_median_s'])} median "
        f"({_ms(min(cold['node_total_s']))}-{_ms(max(cold['node_total_s']))}; "
        f"load {_ms(cold['node_load_median_s'])} + first infer {_ms(cold['node_first_infer_median_s'])})",
        f"  ONNX Runtime bare InferenceSession create, same files, in the bench process: "
        f"{_ms(cold['ort_create_median_s'])} median of {len(cold['ort_create_s'])} "
        f"(+ {_ms(cold['ort_first_run_median_s'])} for its first run)",
    ]
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def options(prog: str, description: str, rounds_help: str) -> argparse.ArgumentParser:
    """The options every bench takes; a bench adds its own."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add = parser.add_argument
    # Many short rounds beat few long ones here: the noise comes in bursts from other work on the machine.
    add("--rounds", type=int, default=6, help=rounds_help)
    add("--seconds", type=float, default=3.0, help="c=16 duration per round and path (default 3)")
    add("--requests", type=int, default=1000, help="c=1 requests per round and path (default 1000)")
    add("--concurrency", type=int, default=16, help="callers in the throughput phase")
    add("--warmup", type=int, default=300, help="requests per path before measuring")
    add("--quick", action="store_true", help="tiny counts for a smoke test (noise)")
    add("--json", action="store_true", help="print JSON instead of the table")
    return parser


QUICK = {"rounds": 1, "seconds": 1.0, "requests": 100, "warmup": 20}  # --quick: fast, its numbers mean nothing


def main(args: argparse.Namespace, run: Callable[[], Json], format_report: Callable[[Json], str],
         log: Callable[[str], None]) -> int:
    """Run the bench and print its table, or JSON; stdout is the result only, progress goes to `log`."""
    try:
        result = run()
    except KeyboardInterrupt:
        log("interrupted; everything it started is stopped")
        return 130
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0
