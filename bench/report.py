"""Medians over rounds, node/floor ratios against the issue's goals, and the printed table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

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


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: each server's median and min-max over rounds, the ratio of medians, the verdict."""
    summary: dict[str, Any] = {}
    for metric in METRICS:
        row: dict[str, Any] = {
            server: _spread([r[server][metric.phase][metric.field] for r in rounds]) for server in SERVERS
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


def _cell(spread: dict[str, Any]) -> str:
    fmt = "{:.0f}" if spread["median"] >= 100 else "{:.3f}"
    if len(spread["values"]) == 1:
        return fmt.format(spread["median"])
    return f"{fmt.format(spread['median'])} ({fmt.format(spread['min'])}-{fmt.format(spread['max'])})"


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
        rows.append((metric.label, _cell(row["floor"]), _cell(row["node"]), ratio, goal, verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        f"meshserve node vs floor: {config['model_mb']:.2f} MB MLP, {config['rounds']} interleaved rounds, "
        f"c=1 {config['requests']} requests, c=16 {config['seconds']:g} s each, "
        f"{'pinned: servers on CPU 0, load generator on CPU 1' if config['pin'] else 'shared CPUs'}",
        f"medians (min-max over rounds); 1-min load average {config['loadavg_1m_before']:.1f} before, "
        f"{config['loadavg_1m_after']:.1f} after",
        "",
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
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
