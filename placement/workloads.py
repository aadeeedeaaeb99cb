"""Request traces for the simulator: synthetic workloads from a spec, or a user's CSV.

A spec is NAME or NAME:key=value,... (`zipf:s=0.8,models=5000`). Every workload is deterministic for
its `seed`. Arrivals are Poisson at `rate` requests per second; model sizes are log-normal around
`size_mb` (spread `size_sigma`, clipped to 1/16x-16x the median), drawn once per model.
"""

from __future__ import annotations

import csv
import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

MB = 1_000_000
_N = TypeVar("_N", int, float)


class TraceError(ValueError):
    """A workload spec or trace file that cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Trace:
    times: list[float]  # seconds, non-decreasing
    models: list[int]  # per request: an index into names and sizes
    names: list[str]
    sizes: list[int]  # bytes, per model

    def __len__(self) -> int:
        return len(self.times)

    def distinct_bytes(self) -> int:
        """Bytes of every model requested at least once: the capacity at which nothing is ever evicted."""
        return sum(self.sizes[m] for m in set(self.models))


_COMMON: dict[str, float] = {
    "models": 10_000, "requests": 100_000, "rate": 20.0, "seed": 1, "size_mb": 64.0, "size_sigma": 0.8,
}
# Per workload: its own parameters' defaults (ints stay ints) and what it is.
_SPECIFIC: dict[str, tuple[dict[str, float], str]] = {
    "zipf": ({"s": 1.0}, "Zipf popularity of skew s over every model, stationary"),
    "shifting": ({"s": 1.0, "every": 300.0, "step": 100},
                 "Zipf whose ranking slides by `step` models every `every` seconds: new models rise, the top falls"),
    "weekly": ({"s": 1.0, "day": 600.0, "weekdays": 5, "weekend": 2},
               "two disjoint halves of the models, Zipf within each, alternating: `weekdays` days of one, "
               "`weekend` days of the other"),
    "bursts": ({"s": 1.0, "hot": 500, "every": 120.0, "burst": 300, "burst_s": 10.0},
               "Zipf over a `hot` set, plus every `every` s a burst of `burst` cold models used once each "
               "within `burst_s` s"),
}
NAMES = tuple(_SPECIFIC)


def describe() -> str:
    lines = [f"  {name}: {text}; defaults {_fmt(params)}" for name, (params, text) in _SPECIFIC.items()]
    return "\n".join([*lines, f"  common parameters: {_fmt(_COMMON)}"])


def _fmt(params: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in params.items())


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """NAME[:key=value,...] -> the workload's name and every parameter, defaults filled in."""
    name, _, rest = spec.partition(":")
    if name not in _SPECIFIC:
        raise TraceError(f"unknown workload {name!r}; known: {', '.join(NAMES)}")
    defaults = _COMMON | _SPECIFIC[name][0]
    params = dict(defaults)
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if key not in defaults or not eq:
            raise TraceError(f"{name}: bad parameter {item!r}; known: {_fmt(defaults)}")
        try:
            params[key] = int(value) if isinstance(defaults[key], int) else float(value)
        except ValueError:
            raise TraceError(f"{name}: {key} must be a number, not {value!r}") from None
        if params[key] < 0 or (params[key] == 0 and key not in ("seed", "size_sigma")):
            raise TraceError(f"{name}: {key} must be positive, not {value!r}")
    if name == "bursts" and params["hot"] >= params["models"]:
        raise TraceError("bursts: hot must be smaller than models")
    return name, params


def generate(spec: str) -> Trace:
    name, p = parse_spec(spec)
    rng = random.Random(int(p["seed"]))
    n_models, n_requests = int(p["models"]), int(p["requests"])
    by_rank = list(range(n_models))  # popularity rank -> model, so popularity is not size order
    rng.shuffle(by_rank)
    median = p["size_mb"] * MB
    sizes = [int(min(16 * median, max(median / 16, rng.lognormvariate(math.log(median), p["size_sigma"]))))
             for _ in range(n_models)]
    times = list(itertools.accumulate(rng.expovariate(p["rate"]) for _ in range(n_requests)))
    times, models = _GENERATORS[name](rng, times, by_rank, p)
    return Trace(times, models, [f"m{i:05d}" for i in range(n_models)], sizes)


def _zipf_ranks(rng: random.Random, n: int, s: float, count: int) -> list[int]:
    cum = list(itertools.accumulate(1.0 / (r + 1) ** s for r in range(n)))
    return rng.choices(range(n), cum_weights=cum, k=count)


_Params = dict[str, float]
_Requests = tuple[list[float], list[int]]  # times, models
_Generator = Callable[[random.Random, list[float], list[int], _Params], _Requests]


def _zipf(rng: random.Random, times: list[float], by_rank: list[int], p: _Params) -> _Requests:
    return times, [by_rank[r] for r in _zipf_ranks(rng, len(by_rank), p["s"], len(times))]


def _shifting(rng: random.Random, times: list[float], by_rank: list[int], p: _Params) -> _Requests:
    n, step, every = len(by_rank), int(p["step"]), p["every"]
    ranks = _zipf_ranks(rng, n, p["s"], len(times))
    return times, [by_rank[(r + int(t // every) * step) % n] for r, t in zip(ranks, times, strict=True)]


def _weekly(rng: random.Random, times: list[float], by_rank: list[int], p: _Params) -> _Requests:
    half = len(by_rank) // 2
    week, weekdays = int(p["weekdays"]) + int(p["weekend"]), int(p["weekdays"])
    ranks = _zipf_ranks(rng, half, p["s"], len(times))
    return times, [by_rank[r + (0 if int(t // p["day"]) % week < weekdays else half)]
                   for r, t in zip(ranks, times, strict=True)]


def _bursts(rng: random.Random, times: list[float], by_rank: list[int], p: _Params) -> _Requests:
    hot = int(p["hot"])
    events = list(zip(times, (by_rank[r] for r in _zipf_ranks(rng, hot, p["s"], len(times))), strict=True))
    cold = itertools.cycle(by_rank[hot:])  # each burst brings models not seen for a long time
    start = p["every"]
    while start < times[-1]:
        events += [(rng.uniform(start, start + p["burst_s"]), next(cold)) for _ in range(int(p["burst"]))]
        start += p["every"]
    events.sort()
    del events[int(p["requests"]):]
    return [t for t, _ in events], [m for _, m in events]


_GENERATORS: dict[str, _Generator] = {"zipf": _zipf, "shifting": _shifting, "weekly": _weekly, "bursts": _bursts}


def parse_trace(lines: Iterable[str], source: str = "trace") -> Trace:
    """A CSV trace: a header naming `time` (seconds), `model` and `size` (bytes), then one row per request.

    Other columns are ignored. Rows must be in time order, and a model keeps one size throughout.
    """
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        raise TraceError(f"{source}: empty file; expected a header with time,model,size")
    columns = [h.strip().lower() for h in header]
    missing = [c for c in ("time", "model", "size") if c not in columns]
    if missing:
        raise TraceError(f"{source}: line 1: header {header} lacks {', '.join(missing)} (expected time,model,size)")
    it, im, isz = (columns.index(c) for c in ("time", "model", "size"))
    times: list[float] = []
    models: list[int] = []
    index: dict[str, int] = {}
    sizes: list[int] = []
    for row in reader:
        where = f"{source}: line {reader.line_num}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(columns):
            raise TraceError(f"{where}: {len(row)} fields, the header has {len(columns)}")
        name = row[im].strip()
        t, size = _number(row[it], float, "time", where), _number(row[isz], int, "size", where)
        if not name:
            raise TraceError(f"{where}: empty model name")
        if not math.isfinite(t) or t < 0 or size <= 0:
            raise TraceError(f"{where}: time must be a finite number >= 0 and size a positive integer")
        if times and t < times[-1]:
            raise TraceError(f"{where}: time {t:g} is before the previous row's {times[-1]:g}; sort the trace by time")
        m = index.setdefault(name, len(index))
        if m == len(sizes):
            sizes.append(size)
        elif sizes[m] != size:
            raise TraceError(f"{where}: model {name!r} has size {size}, but {sizes[m]} on an earlier row")
        times.append(t)
        models.append(m)
    if not times:
        raise TraceError(f"{source}: no requests after the header")
    return Trace(times, models, list(index), sizes)


def _number(text: str, kind: Callable[[str], _N], column: str, where: str) -> _N:
    try:
        return kind(text.strip())
    except ValueError:
        raise TraceError(f"{where}: {column} {text!r} is not {'an integer' if kind is int else 'a number'}") from None
