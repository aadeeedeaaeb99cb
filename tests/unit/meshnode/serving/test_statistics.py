"""Per model and version counts as Triton's ModelStatistics reports them, and their sum over nodes."""

from __future__ import annotations

from meshnode.runtimes.base import TensorSpec
from meshnode.serving.statistics import ModelStatistics, batches, merge
from meshpb import pb

BATCHED = (TensorSpec("INPUT0", "FP32", (-1, 4)),)
FIXED = (TensorSpec("INPUT0", "FP32", (2, 4)),)


def _request(batch: int) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="INPUT0", datatype="FP32", shape=[batch, 4])])


def test_a_model_batches_when_the_first_dimension_of_every_input_is_dynamic() -> None:
    assert batches(BATCHED)
    assert not batches(FIXED) and not batches(()) and not batches((TensorSpec("s", "FP32", ()),))
    assert not batches((*BATCHED, *FIXED))


def test_successes_count_durations_and_the_batch_as_inferences() -> None:
    stats = ModelStatistics(wall_clock=lambda: 1700000000.5)
    stats.finished("m", "1", BATCHED, _request(3), started=10.0, began=10.25, ended=11.0, ok=True)
    stats.finished("m", "1", BATCHED, _request(1), started=20.0, began=20.0, ended=20.5, ok=True)
    (report,) = stats.report("m")
    assert (report.name, report.version, report.last_inference) == ("m", "1", 1700000000500)
    assert report.inference_count == 4 and report.execution_count == 2
    infer = report.inference_stats
    assert (infer.success.count, infer.success.ns) == (2, 1_500_000_000)
    assert (infer.queue.count, infer.queue.ns) == (2, 250_000_000)
    assert (infer.compute_infer.count, infer.compute_infer.ns) == (2, 1_250_000_000)
    assert infer.compute_input.count == infer.compute_output.count == 2 and infer.fail.count == 0
    assert [(b.batch_size, b.compute_infer.count, b.compute_infer.ns) for b in report.batch_stats] == [
        (1, 1, 500_000_000), (3, 1, 750_000_000)]


def test_a_model_without_a_batch_dimension_counts_one_inference_per_request() -> None:
    stats = ModelStatistics()
    stats.finished("m", "1", FIXED, _request(2), 0.0, 0.0, 1.0, ok=True)
    assert stats.report()[0].inference_count == 1


def test_failures_count_only_as_failures() -> None:
    stats = ModelStatistics()
    stats.finished("m", "2", BATCHED, _request(1), 1.0, 1.5, 2.0, ok=False)
    (report,) = stats.report()
    assert (report.inference_stats.fail.count, report.inference_stats.fail.ns) == (1, 1_000_000_000)
    assert report.inference_stats.success.count == 0 and report.execution_count == 0 and not report.batch_stats


def test_reports_select_by_model_and_version_and_forget_drops_a_model() -> None:
    stats = ModelStatistics()
    for name, version in (("a", "1"), ("a", "2"), ("b", "1")):
        stats.finished(name, version, BATCHED, _request(1), 0.0, 0.0, 1.0, ok=True)
    assert [(s.name, s.version) for s in stats.report()] == [("a", "1"), ("a", "2"), ("b", "1")]
    assert [(s.name, s.version) for s in stats.report("a", "2")] == [("a", "2")]
    assert stats.report("c") == []
    stats.forget("a")
    assert [s.name for s in stats.report()] == ["b"]


def test_merge_sums_nodes_per_model_and_version() -> None:
    one, two = ModelStatistics(wall_clock=lambda: 1.0), ModelStatistics(wall_clock=lambda: 2.0)
    one.finished("m", "1", BATCHED, _request(2), 0.0, 0.0, 1.0, ok=True)
    two.finished("m", "1", BATCHED, _request(2), 0.0, 0.5, 1.0, ok=True)
    two.finished("m", "1", BATCHED, _request(1), 0.0, 0.5, 1.0, ok=False)
    two.finished("n", "1", BATCHED, _request(1), 0.0, 0.5, 1.0, ok=True)
    merged = merge([one.report(), two.report()])
    assert [(s.name, s.inference_stats.success.count) for s in merged] == [("m", 2), ("n", 1)]
    m = merged[0]
    assert m.inference_count == 4 and m.execution_count == 2 and m.last_inference == 2000
    assert (m.inference_stats.fail.count, m.inference_stats.queue.ns) == (1, 500_000_000)
    assert [(b.batch_size, b.compute_infer.count) for b in m.batch_stats] == [(2, 2)]
