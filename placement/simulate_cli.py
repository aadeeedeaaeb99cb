"""`meshserve simulate`: the mesh against its baselines on a synthetic workload or a CSV trace.

The only part of placement/ that touches files: it reads the trace, writes plots, prints the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from placement.copies import CopyConfig
from placement.simstats import Result
from placement.simulate import SimConfig, compare
from placement.workloads import Trace, TraceError, describe, generate, parse_trace

FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.4)  # of the trace's model bytes, for --plot
LONG_RUN = 20_000  # requests from which a progress bar is worth drawing
SYSTEMS = ("mesh", "global_lru", "random", "belady")
Sweep = list[tuple[float, dict[str, Result]]]  # (capacity as a share of the model bytes, results)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshserve simulate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the mesh's placement and eviction code on a request trace, next to baselines: "
                    "one ideal LRU cache of the whole capacity, random placement, and Belady's optimum.",
        epilog="workloads (NAME or NAME:key=value,...):\n" + describe(),
    )
    parser.add_argument("--nodes", type=int, required=True, help="nodes in the mesh")
    parser.add_argument("--capacity", required=True,
                        help="each node's capacity: a size (bytes, or units where the command accepts them), or "
                             "P%% for the whole mesh's share of the trace's model bytes")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workload", help="a synthetic workload, e.g. zipf:s=0.8 (see below)")
    source.add_argument("--trace", type=Path, help="CSV with a header time,model,size (seconds, name, bytes)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="also sweep capacity and write hit ratio plots here")
    parser.add_argument("--churn-guard", type=float, default=SimConfig.churn_guard_s, metavar="S",
                        help="a node never evicts a model used within S seconds (default %(default)s)")
    parser.add_argument("--protect", type=float, default=SimConfig.protect_fraction, metavar="F",
                        help="share of each node kept for models used again since their load (default %(default)s)")
    parser.add_argument("--publish-interval", type=float, default=SimConfig.publish_interval_s, metavar="S",
                        help="age of the node records placement sees; 0: always fresh (default %(default)s)")
    parser.add_argument("--copies", action="store_true", help="apply extra-copy decisions periodically")
    parser.add_argument("--proactive", action="store_true", help="apply proactive loads into free space")
    parser.add_argument("--seed", type=int, default=0, help="placement's randomness (default 0)")
    return parser


def main(argv: Sequence[str] | None = None, *, parse_size: Callable[[str], int] = int,
         stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """Exit status 0, or 2 with a message on stderr. `parse_size` reads --capacity sizes (default: bytes)."""
    args = build_parser().parse_args(argv)
    try:
        trace = _load(args)
        config = _config(args, trace, parse_size)
    except (TraceError, ValueError, OSError) as error:
        print(f"meshserve simulate: {error}", file=stderr)
        return 2
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        # An optional extra: only plots need it, so a node's install does not carry it.
        print("meshserve simulate: --plot needs matplotlib: pip install 'meshserve[plot]'", file=stderr)
        return 2
    progress = Progress(stderr, len(trace)) if len(trace) >= LONG_RUN else None
    results = compare(trace, config, progress.update if progress else None)
    report = report_dict(trace, config, results)
    sweep: Sweep = []
    if args.plot is not None:
        sweep = run_sweep(trace, config, FRACTIONS, stderr)
        report["plots"] = [str(p) for p in plot_sweep(sweep, args.workload or args.trace.name, args.plot)]
    if args.json:
        if sweep:
            report["sweep"] = [{"fraction": f, **{k: r.as_dict() for k, r in rs.items()}} for f, rs in sweep]
        print(json.dumps(report, separators=(",", ":")), file=stdout)
    else:
        print(format_report(report), file=stdout)
        if sweep:
            print(format_sweep(sweep), file=stdout)
    return 0


def _load(args: argparse.Namespace) -> Trace:
    if args.workload is not None:
        return generate(args.workload)
    with args.trace.open(newline="") as lines:
        return parse_trace(lines, str(args.trace))


def _config(args: argparse.Namespace, trace: Trace, parse_size: Callable[[str], int]) -> SimConfig:
    if args.nodes < 1:
        raise ValueError("--nodes must be at least 1")
    text = args.capacity.strip()
    try:
        if text.endswith("%"):
            per_node = int(trace.distinct_bytes() * float(text[:-1]) / 100 / args.nodes)
        else:
            per_node = parse_size(text)
    except ValueError:
        raise ValueError(f"--capacity {text!r} is neither a size nor a percentage like 10%") from None
    return SimConfig(
        nodes=args.nodes, capacity_bytes=per_node, churn_guard_s=args.churn_guard, protect_fraction=args.protect,
        publish_interval_s=args.publish_interval, copies=CopyConfig() if args.copies else None,
        proactive=args.proactive, seed=args.seed,
    )


class Progress:
    """A one-line progress bar on a terminal; nothing when the stream is not one (logs stay clean)."""

    def __init__(self, stream: TextIO, total: int, label: str = "mesh", width: int = 30) -> None:
        self._stream = stream
        self._total = max(1, total)
        self._label = label
        self._width = width
        self._shown = stream.isatty()

    def update(self, done: int) -> None:
        if not self._shown:
            return
        filled = self._width * done // self._total
        end = "\n" if done >= self._total else ""
        bar = "#" * filled + "." * (self._width - filled)
        self._stream.write(f"\r{self._label} [{bar}] {done}/{self._total}{end}")
        self._stream.flush()


def report_dict(trace: Trace, config: SimConfig, results: dict[str, Result]) -> dict[str, Any]:
    """The mesh's figures at the top level, each baseline's under `baselines`, and what was simulated."""
    model_bytes = trace.distinct_bytes()
    total = config.nodes * config.capacity_bytes
    setup = {
        "requests": len(trace), "models": len(set(trace.models)), "model_bytes": model_bytes,
        "nodes": config.nodes, "capacity_bytes": config.capacity_bytes,
        "capacity_fraction": round(total / model_bytes, 4) if model_bytes else 0.0,
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)
           if f.name in ("churn_guard_s", "protect_fraction", "publish_interval_s", "proactive", "seed")},
        "copies": config.copies is not None,
    }
    return {
        **results["mesh"].as_dict(),
        "baselines": {name: r.as_dict() for name, r in results.items() if name != "mesh"},
        "setup": setup,
    }


def format_report(report: dict[str, Any]) -> str:
    s = report["setup"]
    rows = {"mesh": report, **report["baselines"]}
    lines = [
        f"{s['requests']} requests over {s['models']} models ({s['model_bytes'] / 1e9:.1f} GB); mesh of {s['nodes']} "
        f"nodes x {s['capacity_bytes'] / 1e9:.2f} GB = {100 * s['capacity_fraction']:.1f}% of the model bytes",
        f"{'':12}{'hit ratio':>10}{'loads':>9}{'evictions':>10}{'load GB':>9}{'rejected':>9}{'mean ms':>9}"
        f"{'p99 ms':>9}",
    ]
    for name, r in rows.items():
        lines.append(
            f"{name:12}{r['hit_ratio']:>10.4f}{r['loads']:>9}{r['evictions']:>10}{r['load_bytes'] / 1e9:>9.1f}"
            f"{r['rejected']:>9}{r['latency_mean_ms']:>9.1f}{r['latency_p99_ms']:>9.0f}"
        )
    lines.append(
        f"mesh: {report['duplicate_loads']} duplicate loads, {report['waited']} requests waited for a load in "
        f"progress, {report['extra_loads']} extra-copy/proactive loads, {report['removals']} copies removed"
    )
    return "\n".join(lines)


def run_sweep(trace: Trace, config: SimConfig, fractions: Sequence[float], stderr: TextIO | None = None) -> Sweep:
    """Every system at each capacity, given as a share of the trace's model bytes spread over the nodes."""
    model_bytes = trace.distinct_bytes()
    progress = Progress(stderr, len(fractions), "capacity sweep") if stderr is not None else None
    sweep: Sweep = []
    for i, fraction in enumerate(fractions):
        per_node = max(1, int(model_bytes * fraction / config.nodes))
        sweep.append((fraction, compare(trace, dataclasses.replace(config, capacity_bytes=per_node))))
        if progress is not None:
            progress.update(i + 1)
    return sweep


def format_sweep(sweep: Sweep) -> str:
    lines = [f"{'capacity':>9}" + "".join(f"{name:>12}" for name in SYSTEMS)]
    for fraction, results in sweep:
        lines.append(f"{100 * fraction:>8.0f}%" + "".join(f"{results[n].hit_ratio:>12.4f}" for n in SYSTEMS))
    return "\n".join(lines)


def plot_sweep(sweep: Sweep, title: str, directory: Path) -> list[Path]:
    """hit_ratio_<title>.png in `directory`: hit ratio against capacity, one line per system."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and none may exist
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [100 * f for f, _ in sweep]
    for name, style in zip(SYSTEMS, ("o-", "s--", "^:", "d-."), strict=True):
        ax.plot(xs, [rs[name].hit_ratio for _, rs in sweep], style, label=name)
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}%" for x in xs])
    ax.set_xlabel("mesh capacity, share of the model bytes requested")
    ax.set_ylabel("hit ratio")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    path = directory / f"hit_ratio_{_slug(title)}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _slug(text: str) -> str:
    return "_".join("".join(c if c.isalnum() or c in ".-" else " " for c in text).split())


if __name__ == "__main__":
    sys.exit(main())
