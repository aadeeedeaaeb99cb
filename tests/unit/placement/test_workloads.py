from __future__ import annotations

from collections import Counter

import pytest

from placement.workloads import MB, NAMES, Trace, TraceError, generate, parse_spec, parse_trace

SMALL = "models=1000,requests=20000"


def test_spec_defaults_and_overrides() -> None:
    name, params = parse_spec("zipf:s=0.8,models=50,seed=3")
    assert name == "zipf"
    assert params["s"] == 0.8 and params["models"] == 50 and isinstance(params["models"], int)
    assert params["requests"] == 100_000 and params["rate"] == 20.0
    assert parse_spec("bursts")[1]["hot"] == 500


@pytest.mark.parametrize(("spec", "message"), [
    ("nope", "unknown workload 'nope'"),
    ("zipf:q=1", "bad parameter 'q=1'"),
    ("zipf:s", "bad parameter 's'"),
    ("zipf:s=abc", "s must be a number"),
    ("zipf:models=1.5", "models must be a number"),
    ("zipf:rate=-1", "rate must be positive"),
    ("zipf:requests=0", "requests must be positive"),
    ("bursts:hot=20000", "hot must be smaller than models"),
])
def test_spec_errors_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_spec(spec)


@pytest.mark.parametrize("name", NAMES)
def test_every_workload_is_deterministic_and_well_formed(name: str) -> None:
    trace = generate(f"{name}:{SMALL}")
    assert trace == generate(f"{name}:{SMALL}")
    assert trace.models != generate(f"{name}:{SMALL},seed=2").models
    assert len(trace) == 20_000
    assert all(a <= b for a, b in zip(trace.times, trace.times[1:], strict=False))
    assert all(4 * MB <= s <= 1024 * MB for s in trace.sizes)  # 1/16x-16x the 64 MB median
    assert trace.distinct_bytes() == sum(trace.sizes[m] for m in set(trace.models))


def top_share(trace: Trace) -> float:
    return Counter(trace.models).most_common(1)[0][1] / len(trace)


def test_zipf_skew_concentrates_requests() -> None:
    shares = [top_share(generate(f"zipf:s={s},{SMALL}")) for s in (0.8, 1.0, 1.2)]
    assert shares[0] < shares[1] < shares[2]


def test_shifting_moves_the_top_models() -> None:
    trace = generate(f"shifting:every=100,step=50,{SMALL}")
    early = Counter(m for m, t in zip(trace.models, trace.times, strict=True) if t < 100).most_common(3)
    late = Counter(m for m, t in zip(trace.models, trace.times, strict=True) if 500 <= t < 600).most_common(3)
    assert not {m for m, _ in early} & {m for m, _ in late}


def test_weekly_alternates_two_disjoint_sets() -> None:
    trace = generate(f"weekly:day=100,weekdays=5,weekend=2,{SMALL}")
    day = [int(t // 100) % 7 for t in trace.times]
    weekday = {m for m, d in zip(trace.models, day, strict=True) if d < 5}
    weekend = {m for m, d in zip(trace.models, day, strict=True) if d >= 5}
    assert weekday and weekend and not weekday & weekend


def test_bursts_bring_cold_models_used_once() -> None:
    trace = generate(f"bursts:hot=100,every=100,burst=50,burst_s=5,{SMALL}")
    in_burst = [m for m, t in zip(trace.models, trace.times, strict=True) if t % 100 < 5 and t >= 100]
    hot = {m for m, t in zip(trace.models, trace.times, strict=True) if t % 100 >= 5}
    cold = [m for m in in_burst if m not in hot]
    assert len(hot) <= 100
    assert len(cold) >= 50 * 5 and Counter(cold).most_common(1)[0][1] == 1


# -- CSV traces -----------------------------------------------------------------------------------


def test_reads_a_trace_with_extra_columns_in_any_order() -> None:
    trace = parse_trace(["size,model,time,user", "100,a,0,x", "200,b,1.5,y", "100,a,2,z", ""])
    assert trace.times == [0.0, 1.5, 2.0]
    assert [trace.names[m] for m in trace.models] == ["a", "b", "a"]
    assert trace.sizes == [100, 200]


@pytest.mark.parametrize(("lines", "message"), [
    ([], "empty file"),
    (["time,model"], "lacks size"),
    (["time,model,size"], "no requests"),
    (["time,model,size", "x,a,1"], "line 2: time 'x' is not a number"),
    (["time,model,size", "0,a,1.5"], "line 2: size '1.5' is not an integer"),
    (["time,model,size", "0,a,-4"], "line 2: .*size a positive integer"),
    (["time,model,size", "0,,4"], "line 2: empty model name"),
    (["time,model,size", "0,a"], "line 2: 2 fields, the header has 3"),
    (["time,model,size", "5,a,4", "4,b,4"], "line 3: time 4 is before the previous row's 5; sort"),
    (["time,model,size", "0,a,4", "1,a,5"], "line 3: model 'a' has size 5, but 4 on an earlier row"),
    (["time,model,size", "nan,a,4"], "line 2: time must be a finite number"),
])
def test_trace_errors_name_the_line_and_the_fix(lines: list[str], message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_trace(lines, "t.csv")
