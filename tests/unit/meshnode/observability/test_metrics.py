import time
import timeit
from dataclasses import replace

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from meshnode.observability.metrics import MeshTotals, NodeMetrics, NodeState

MS_BOUNDS = ["0.5", "1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "75.0", "100.0", "200.0", "500.0", "1000.0"]
MS_BOUNDS += ["2000.0", "5000.0", "10000.0", "20000.0", "60000.0", "120000.0", "300000.0", "+Inf"]

# With ModelMesh's method and code labels (and modelId with per-model metrics): no series until observed.
LABELLED = {
    "modelmesh_invoke_model_milliseconds",
    "modelmesh_api_request_milliseconds",
    "modelmesh_request_size_bytes",
    "modelmesh_response_size_bytes",
}
HISTOGRAMS = {
    "modelmesh_cache_miss_milliseconds",
    "modelmesh_loadmodel_milliseconds",
    "modelmesh_unloadmodel_milliseconds",
    "modelmesh_age_at_eviction_milliseconds",
    "modelmesh_req_queue_delay_milliseconds",
    "modelmesh_loading_queue_delay_milliseconds",
    "modelmesh_model_sizing_milliseconds",
    "modelmesh_loaded_model_size_bytes",
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
    "modelmesh_unloadmodel_attempt_failure": "unload_attempt_failures",
    "modelmesh_evictions": "evictions",
    "meshserve_etcd_writes": "etcd_writes",
    "meshserve_requests_rejected": "requests_rejected",
    "meshserve_hops_stripped": "hops_stripped",
}
# Counted by the disk tier, read from the scrape's state: name -> its NodeState field.
STATE_COUNTERS = {
    "meshserve_storage_pulled_bytes": "storage_pulled_bytes",
    "meshserve_storage_pull_seconds": "storage_pull_seconds",
    "meshserve_disk_cache_hits": "disk_cache_hits",
    "meshserve_disk_cache_misses": "disk_cache_misses",
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
    "meshserve_disk_cache_bytes",
    "meshserve_disk_cache_models",
}


def parse(text: bytes) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


def samples(family: Metric) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("le", "")): s.value for s in family.samples}


def state() -> NodeState:
    return NodeState(
        capacity_bytes=4000, used_bytes=1000, models_loaded=7, lru_time_s=time.time() - 90, requests_queued=6,
        storage_pulled_bytes=5_000_000, storage_pull_seconds=1.5, disk_cache_hits=3, disk_cache_misses=2,
        disk_cache_bytes=7_000_000, disk_cache_models=2,
        mesh=MeshTotals(models_loaded=9, models_with_failure=2, models_managed=20),
    )  # fmt: skip


def labelled(family: Metric) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Sample name and its labels other than le -> value, for the _count and _sum samples."""
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))): s.value
            for s in family.samples if not s.name.endswith("_bucket")}


def test_render_has_every_name_with_its_value() -> None:
    m = NodeMetrics()
    for i, attr in enumerate(COUNTERS.values(), start=1):
        setattr(m, attr, i)
    m.observe_invoke("ModelInfer", "OK", 3, "a")
    m.observe_api("ModelInfer", "OK", 4, "a", 300, 1000)
    m.observe_cache_miss_ms(250)
    m.observe_load(1500, 2**20)
    m.observe_unload_ms(7)
    m.observe_eviction_age_ms(45_000)
    m.observe_queue_delay_ms(30)
    m.observe_loading_queue_delay_ms(12)
    m.observe_sizing_ms(0.3)
    lru = time.time() - 90
    families = parse(m.render(replace(state(), lru_time_s=lru, etcd_writes=m.etcd_writes)))

    assert set(families) == HISTOGRAMS | LABELLED | set(COUNTERS) | set(STATE_COUNTERS) | GAUGES
    for i, (name, _attr) in enumerate(COUNTERS.items(), start=1):
        assert families[name].type == "counter"
        assert samples(families[name]) == {(name + "_total", ""): i}
    sums = {
        "modelmesh_cache_miss_milliseconds": 250,
        "modelmesh_loadmodel_milliseconds": 1500,
        "modelmesh_unloadmodel_milliseconds": 7,
        "modelmesh_age_at_eviction_milliseconds": 45_000,
        "modelmesh_req_queue_delay_milliseconds": 30,
        "modelmesh_loading_queue_delay_milliseconds": 12,
        "modelmesh_model_sizing_milliseconds": 0.3,
        "modelmesh_loaded_model_size_bytes": 2**20,
    }
    for name, total in sums.items():
        got = samples(families[name])
        assert families[name].type == "histogram"
        assert got[(name + "_count", "")] == 1
        assert got[(name + "_sum", "")] == total
    ok = (("code", "OK"), ("method", "ModelInfer"))
    for name, total in (("modelmesh_invoke_model_milliseconds", 3), ("modelmesh_api_request_milliseconds", 4),
                        ("modelmesh_request_size_bytes", 300), ("modelmesh_response_size_bytes", 1000)):
        assert labelled(families[name]) == {(name + "_count", ok): 1, (name + "_sum", ok): total}
    for name, field in STATE_COUNTERS.items():
        assert families[name].type == "counter"
        assert samples(families[name]) == {(name + "_total", ""): getattr(state(), field)}
    gauge = {name: samples(families[name])[(name, "")] for name in GAUGES}
    assert gauge["meshserve_disk_cache_bytes"] == 7_000_000 and gauge["meshserve_disk_cache_models"] == 2
    assert families["modelmesh_instance_capacity_bytes"].type == "gauge"
    assert gauge["modelmesh_instance_capacity_bytes"] == 4000
    assert gauge["modelmesh_instance_used_bytes"] == 1000
    assert gauge["modelmesh_instance_used_bps"] == 2500
    assert gauge["modelmesh_instance_models_total"] == 7
    assert gauge["modelmesh_models_loaded_total"] == 9  # the mesh's, not this node's
    assert gauge["modelmesh_models_managed_total"] == 20
    assert gauge["modelmesh_models_with_failure_total"] == 2
    assert gauge["meshserve_requests_queued"] == 6
    assert gauge["modelmesh_instance_lru_seconds"] == pytest.approx(lru)
    assert 89 <= gauge["modelmesh_instance_lru_age_seconds"] <= 100


def test_sample_names_have_no_doubled_suffixes() -> None:
    m = NodeMetrics()
    names = {s.name for family in parse(m.render(state())).values() for s in family.samples}

    expected = {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}  # LABELLED: none yet
    expected |= {c + "_total" for c in (*COUNTERS, *STATE_COUNTERS)} | GAUGES
    assert names == expected


def test_buckets_are_modelmesh_bounds_cumulative_and_le_inclusive() -> None:
    m = NodeMetrics()
    for ms in (0.1, 0.5, 0.6, 1.0, 74.9, 75.0, 75.1, 300_000, 300_001, 1e9):
        m.observe_cache_miss_ms(ms)

    family = parse(m.render())["modelmesh_cache_miss_milliseconds"]
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
    assert got[("modelmesh_cache_miss_milliseconds_count", "")] == 10
    assert got[("modelmesh_cache_miss_milliseconds_sum", "")] == pytest.approx(
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


def test_instances_are_independent() -> None:
    a, b = NodeMetrics(), NodeMetrics()
    a.cache_hits = 5
    a.observe_load(1, 10)

    fa, fb = parse(a.render()), parse(b.render())

    assert samples(fa["modelmesh_cache_hit"]) == {("modelmesh_cache_hit_total", ""): 5}
    assert samples(fb["modelmesh_cache_hit"]) == {("modelmesh_cache_hit_total", ""): 0}
    assert samples(fb["modelmesh_loadmodel_milliseconds"])[("modelmesh_loadmodel_milliseconds_count", "")] == 0


def test_hot_path_cost() -> None:
    m = NodeMetrics()
    n, repeat = 100_000, 5

    def best_us(stmt: str) -> float:
        return min(timeit.repeat(stmt, globals={"m": m}, number=n, repeat=repeat)) / n * 1e6

    per_call_us = {
        "observe_invoke": best_us("m.observe_invoke('ModelInfer', 'OK', 3.2, 'a')"),
        "observe_api": best_us("m.observe_api('ModelInfer', 'OK', 3.2, 'a', 300, 900)"),
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
    assert samples(families["modelmesh_api_request_milliseconds"])[
        ("modelmesh_api_request_milliseconds_count", "")] == n * repeat
    assert samples(families["modelmesh_cache_hit"]) == {("modelmesh_cache_hit_total", ""): n * repeat}


def test_labels_are_method_and_status_code() -> None:
    m = NodeMetrics()
    m.observe_api("ModelInfer", "OK", 2, "a", 100, 200)
    m.observe_api("ModelInfer", "NOT_FOUND", 1, "b", 100, None)  # a failed request has no response
    m.observe_api("ModelInfer", "OK", 3, "c", 100, 300)

    families = parse(m.render())

    count = labelled(families["modelmesh_api_request_milliseconds"])
    assert count[("modelmesh_api_request_milliseconds_count", (("code", "OK"), ("method", "ModelInfer")))] == 2
    assert count[("modelmesh_api_request_milliseconds_count",
                  (("code", "NOT_FOUND"), ("method", "ModelInfer")))] == 1
    sizes = labelled(families["modelmesh_response_size_bytes"])
    assert set(sizes) == {("modelmesh_response_size_bytes_" + s, (("code", "OK"), ("method", "ModelInfer")))
                          for s in ("count", "sum")}
    assert {s.labels.get("le") for s in families["modelmesh_request_size_bytes"].samples} >= {"128.0", "2097152.0"}


def test_per_model_labels_only_for_the_busiest_models() -> None:
    m = NodeMetrics(per_model_metrics=2)
    for model, requests in (("hot", 30), ("warm", 20), ("cold", 5)):
        for _ in range(requests):
            m.observe_api("ModelInfer", "OK", 1, model, 10, 10)
    m.render()  # each scrape chooses the models labelled from then on, by their requests lately
    for model in ("hot", "warm", "cold"):
        m.observe_api("ModelInfer", "OK", 1, model, 10, 10)
        m.observe_invoke("ModelInfer", "OK", 1, model)

    families = parse(m.render())

    for name in ("modelmesh_api_request_milliseconds", "modelmesh_invoke_model_milliseconds"):
        counts = {dict(labels)["modelId"]: v for (sample, labels), v in labelled(families[name]).items()
                  if sample.endswith("_count")}
        assert set(counts) == {"hot", "warm", ""}  # cold is counted with every other model, under ""
    api = {dict(labels)["modelId"]: v for (sample, labels), v
           in labelled(families["modelmesh_api_request_milliseconds"]).items() if sample.endswith("_count")}
    assert api == {"hot": 1, "warm": 1, "": 56}  # every request counted exactly once


def test_a_model_that_goes_quiet_loses_its_label() -> None:
    m = NodeMetrics(per_model_metrics=1)
    m.observe_api("ModelInfer", "OK", 1, "old", 10, 10)
    m.render()
    m.observe_api("ModelInfer", "OK", 1, "old", 10, 10)
    for _ in range(5):
        m.observe_api("ModelInfer", "OK", 1, "new", 10, 10)
    m.render()  # "new" is now the busiest
    m.observe_api("ModelInfer", "OK", 1, "new", 10, 10)

    models = {s.labels["modelId"] for s in parse(m.render())["modelmesh_api_request_milliseconds"].samples}

    assert models == {"new", ""}  # old's series is no longer exported: the label set stays at N + 1


def test_mesh_gauges_only_from_the_node_reporting_for_the_mesh() -> None:
    families = parse(NodeMetrics().render(replace(state(), mesh=None)))

    for name in ("modelmesh_models_loaded_total", "modelmesh_models_with_failure_total",
                 "modelmesh_models_managed_total"):
        assert name not in families
    assert samples(families["modelmesh_instance_models_total"]) == {("modelmesh_instance_models_total", ""): 7}
