import asyncio
import time
import timeit
import urllib.error
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from meshnode.observability import metrics as metrics_mod
from meshnode.observability.metrics import NodeMetrics, NodeState, serve_metrics

MS_BOUNDS = ["0.5", "1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "75.0", "100.0", "200.0", "500.0", "1000.0"]
MS_BOUNDS += ["2000.0", "5000.0", "10000.0", "20000.0", "60000.0", "120000.0", "300000.0", "+Inf"]

HISTOGRAMS = {
    "modelmesh_invoke_model_milliseconds",
    "modelmesh_api_request_milliseconds",
    "modelmesh_cache_miss_milliseconds",
    "modelmesh_loadmodel_milliseconds",
    "modelmesh_unloadmodel_milliseconds",
    "modelmesh_age_at_eviction_milliseconds",
    "modelmesh_req_queue_delay_milliseconds",
}
COUNTERS = {
    "modelmesh_invoke_model": "invoke_count",
    "modelmesh_invoke_model_failure": "invoke_failures",
    "modelmesh_api_request": "api_requests",
    "modelmesh_cache_hit": "cache_hits",
    "modelmesh_cache_miss": "cache_misses",
    "modelmesh_loadmodel": "loads",
    "modelmesh_loadmodel_failure": "load_failures",
    "modelmesh_unloadmodel": "unloads",
    "modelmesh_unloadmodel_failure": "unload_failures",
    "modelmesh_evictions": "evictions",
    "meshserve_etcd_writes": "etcd_writes",
    "meshserve_requests_rejected": "requests_rejected",
    "meshserve_hops_stripped": "hops_stripped",
}
GAUGES = {
    "modelmesh_instance_lru_seconds",
    "modelmesh_instance_lru_age_seconds",
    "modelmesh_instance_capacity_bytes",
    "modelmesh_instance_used_bytes",
    "modelmesh_instance_used_bps",
    "modelmesh_instance_models_total",
    "modelmesh_models_loaded_total",
    "modelmesh_models_with_failure_total",
    "modelmesh_models_managed_total",
    "meshserve_requests_queued",
}


def parse(text: bytes) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


def samples(family: Metric) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("le", "")): s.value for s in family.samples}


def state() -> NodeState:
    return NodeState(
        capacity_bytes=4000, used_bytes=1000, models_loaded=7, models_managed=20, models_with_failure=2,
        lru_time_s=time.time() - 90, requests_queued=6,
    )  # fmt: skip


def test_render_has_every_name_with_its_value() -> None:
    m = NodeMetrics()
    for i, attr in enumerate(COUNTERS.values(), start=1):
        setattr(m, attr, i)
    m.observe_invoke_ms(3)
    m.observe_api_ms(4)
    m.observe_cache_miss_ms(250)
    m.observe_load_ms(1500)
    m.observe_unload_ms(7)
    m.observe_eviction_age_ms(45_000)
    m.observe_queue_delay_ms(30)
    lru = time.time() - 90
    families = parse(m.render(replace(state(), lru_time_s=lru, etcd_writes=m.etcd_writes)))

    assert set(families) == HISTOGRAMS | set(COUNTERS) | GAUGES
    for i, (name, _attr) in enumerate(COUNTERS.items(), start=1):
        assert families[name].type == "counter"
        assert samples(families[name]) == {(name + "_total", ""): i}
    sums = {
        "modelmesh_invoke_model_milliseconds": 3,
        "modelmesh_api_request_milliseconds": 4,
        "modelmesh_cache_miss_milliseconds": 250,
        "modelmesh_loadmodel_milliseconds": 1500,
        "modelmesh_unloadmodel_milliseconds": 7,
        "modelmesh_age_at_eviction_milliseconds": 45_000,
        "modelmesh_req_queue_delay_milliseconds": 30,
    }
    for name, total in sums.items():
        got = samples(families[name])
        assert families[name].type == "histogram"
        assert got[(name + "_count", "")] == 1
        assert got[(name + "_sum", "")] == total
    gauge = {name: samples(families[name])[(name, "")] for name in GAUGES}
    assert families["modelmesh_instance_capacity_bytes"].type == "gauge"
    assert gauge["modelmesh_instance_capacity_bytes"] == 4000
    assert gauge["modelmesh_instance_used_bytes"] == 1000
    assert gauge["modelmesh_instance_used_bps"] == 2500
    assert gauge["modelmesh_instance_models_total"] == 7
    assert gauge["modelmesh_models_loaded_total"] == 7
    assert gauge["modelmesh_models_managed_total"] == 20
    assert gauge["modelmesh_models_with_failure_total"] == 2
    assert gauge["meshserve_requests_queued"] == 6
    assert gauge["modelmesh_instance_lru_seconds"] == pytest.approx(lru)
    assert 89 <= gauge["modelmesh_instance_lru_age_seconds"] <= 100


def test_sample_names_have_no_doubled_suffixes() -> None:
    m = NodeMetrics()
    names = {s.name for family in parse(m.render(state())).values() for s in family.samples}

    expected = {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    expected |= {c + "_total" for c in COUNTERS} | GAUGES
    assert names == expected


def test_buckets_are_modelmesh_bounds_cumulative_and_le_inclusive() -> None:
    m = NodeMetrics()
    for ms in (0.1, 0.5, 0.6, 1.0, 74.9, 75.0, 75.1, 300_000, 300_001, 1e9):
        m.observe_invoke_ms(ms)

    family = parse(m.render())["modelmesh_invoke_model_milliseconds"]
    buckets = [(s.labels["le"], s.value) for s in family.samples if s.name.endswith("_bucket")]

    assert [le for le, _ in buckets] == MS_BOUNDS
    cumulative = dict(buckets)
    assert cumulative["0.5"] == 2  # 0.1 and exactly 0.5
    assert cumulative["1.0"] == 4
    assert cumulative["50.0"] == 4
    assert cumulative["75.0"] == 6  # 74.9 and exactly 75
    assert cumulative["100.0"] == 7
    assert cumulative["300000.0"] == 8
    assert cumulative["+Inf"] == 10
    values = [v for _, v in buckets]
    assert values == sorted(values)
    got = samples(family)
    assert got[("modelmesh_invoke_model_milliseconds_count", "")] == 10
    assert got[("modelmesh_invoke_model_milliseconds_sum", "")] == pytest.approx(
        0.1 + 0.5 + 0.6 + 1.0 + 74.9 + 75.0 + 75.1 + 300_000 + 300_001 + 1e9
    )


def test_queue_delay_counts_requests_that_ran_without_waiting_in_its_first_bucket() -> None:
    m = NodeMetrics()
    m.ran_without_waiting += 3  # what the hit path bumps instead of observing 0
    m.observe_queue_delay_ms(0.2)
    m.observe_queue_delay_ms(150)

    got = samples(parse(m.render())["modelmesh_req_queue_delay_milliseconds"])

    name = "modelmesh_req_queue_delay_milliseconds"
    assert got[(name + "_bucket", "0.5")] == 4
    assert got[(name + "_bucket", "100.0")] == 4
    assert got[(name + "_bucket", "200.0")] == 5
    assert got[(name + "_bucket", "+Inf")] == got[(name + "_count", "")] == 5
    assert got[(name + "_sum", "")] == pytest.approx(150.2)


def test_eviction_age_uses_modelmesh_age_buckets() -> None:
    m = NodeMetrics()
    m.observe_eviction_age_ms(10_000)
    m.observe_eviction_age_ms(2 * 3_600_000)
    family = parse(m.render())["modelmesh_age_at_eviction_milliseconds"]
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}

    assert list(buckets) == [
        "30000.0", "300000.0", "900000.0", "3600000.0", "14400000.0", "43200000.0", "86400000.0",
        "604800000.0", "2592000000.0", "7776000000.0", "+Inf",
    ]  # fmt: skip
    assert buckets["30000.0"] == 1
    assert buckets["3600000.0"] == 1
    assert buckets["14400000.0"] == 2


@pytest.mark.timeout(20)
async def test_gauges_follow_the_state_source() -> None:
    m = NodeMetrics()
    assert not GAUGES & set(parse(m.render()))

    calls = 0

    def source() -> NodeState:
        nonlocal calls
        calls += 1
        return replace(state(), capacity_bytes=0, used_bytes=0, lru_time_s=None)

    server = await serve_metrics(m, "127.0.0.1", 0, source)
    try:
        families = parse((await _get(f"http://127.0.0.1:{server.port}/metrics"))[2])
    finally:
        await server.close()

    assert calls == 1  # one snapshot per scrape, however many gauges read it
    assert "modelmesh_instance_lru_seconds" not in families
    assert samples(families["modelmesh_instance_lru_age_seconds"]) == {
        ("modelmesh_instance_lru_age_seconds", ""): 0
    }
    assert samples(families["modelmesh_instance_used_bps"]) == {("modelmesh_instance_used_bps", ""): 0}


def test_instances_are_independent() -> None:
    a, b = NodeMetrics(), NodeMetrics()
    a.cache_hits = 5
    a.observe_api_ms(1)

    fa, fb = parse(a.render()), parse(b.render())

    assert samples(fa["modelmesh_cache_hit"]) == {("modelmesh_cache_hit_total", ""): 5}
    assert samples(fb["modelmesh_cache_hit"]) == {("modelmesh_cache_hit_total", ""): 0}
    assert (
        samples(fb["modelmesh_api_request_milliseconds"])[("modelmesh_api_request_milliseconds_count", "")]
        == 0
    )


async def _get(url: str) -> tuple[int, str, bytes]:
    def fetch() -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.headers["Content-Type"], resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers["Content-Type"], err.read()

    return await asyncio.to_thread(fetch)


async def _raw(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:  # the server dropped us with our bytes still unread
        return b""
    finally:
        writer.close()


@pytest.mark.timeout(20)
async def test_http_endpoint_serves_render_on_loopback() -> None:
    m = NodeMetrics()
    m.cache_hits = 3
    m.observe_invoke_ms(2)
    server = await serve_metrics(m, "127.0.0.1", 0, state)
    try:
        assert server.port > 0
        status, content_type, body = await _get(f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        families = parse(body)
        assert set(families) == HISTOGRAMS | set(COUNTERS) | GAUGES
        assert samples(families["modelmesh_cache_hit"]) == {("modelmesh_cache_hit_total", ""): 3}

        assert (await _get(f"http://127.0.0.1:{server.port}/other"))[0] == 404
        assert (await _get(f"http://127.0.0.1:{server.port}/metrics?x=1"))[0] == 200
        assert (await _raw(server.port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
    finally:
        await server.close()


@pytest.mark.timeout(20)
async def test_garbage_requests_do_not_kill_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_mod, "_READ_TIMEOUT_S", 0.2)
    m = NodeMetrics()
    server = await serve_metrics(m, "127.0.0.1", 0)
    try:
        assert (await _raw(server.port, b"\x16\x03\x01\x00\xff\x00garbage\r\n\r\n")).startswith(
            b"HTTP/1.1 400"
        )
        assert (await _raw(server.port, b"GET\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert await _raw(server.port, b"A" * 20_000) == b""  # head over the limit: dropped
        assert await _raw(server.port, b"GET /metr") == b""  # stalls until the read timeout, then dropped
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HT")  # peer vanishes mid-request
        writer.close()

        status, _, body = await _get(f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200 and b"modelmesh_invoke_model_total 0.0" in body
    finally:
        await server.close()


@pytest.mark.timeout(20)
async def test_failing_state_source_costs_one_scrape_and_close_drops_idle_peers() -> None:
    m = NodeMetrics()
    healthy = False

    def source() -> NodeState:
        if not healthy:
            raise RuntimeError("node state unavailable")
        return state()

    server = await serve_metrics(m, "127.0.0.1", 0, source)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        assert (await _get(f"http://127.0.0.1:{server.port}/metrics"))[0] == 500
        healthy = True
        assert (await _get(f"http://127.0.0.1:{server.port}/metrics"))[0] == 200
    finally:
        started = time.monotonic()
        await server.close()  # must not wait for the idle peer's read timeout
        assert time.monotonic() - started < 1
        assert await asyncio.wait_for(idle_reader.read(), 2) == b""
        idle_writer.close()


def test_hot_path_cost() -> None:
    m = NodeMetrics()
    n, repeat = 100_000, 5

    def best_us(stmt: str) -> float:
        return min(timeit.repeat(stmt, globals={"m": m}, number=n, repeat=repeat)) / n * 1e6

    per_call_us = {
        "observe_invoke_ms": best_us("m.observe_invoke_ms(3.2)"),
        "observe_api_ms": best_us("m.observe_api_ms(3.2)"),
        "cache_hits += 1": best_us("m.cache_hits += 1"),
        "render (per scrape)": min(timeit.repeat(m.render, number=20, repeat=3)) / 20 * 1e6,
    }
    print()
    for what, us in per_call_us.items():
        print(f"  {what:>22}: {us:9.3f} µs (best of {repeat})")

    families = parse(m.render())
    invoke = samples(families["modelmesh_invoke_model_milliseconds"])
    assert invoke[("modelmesh_invoke_model_milliseconds_count", "")] == n * repeat
    assert invoke[("modelmesh_invoke_model_milliseconds_bucket", "2.0")] == 0
    assert invoke[("modelmesh_invoke_model_milliseconds_bucket", "5.0")] == n * repeat
    assert samples(families["modelmesh_cache_hit"]) == {("modelmesh_cache_hit_total", ""): n * repeat}
