"""Fixed-bucket histograms cheap enough for the request path, each its own prometheus_client collector.

An observation is a dict get, a bisect and a list slot (well under a microsecond); OpenTelemetry's
``Histogram.record()`` costs ~8.5 µs here, and OTel has no asynchronous histogram to read them at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Container, Iterator
from itertools import accumulate

from prometheus_client.metrics_core import HistogramMetricFamily

__all__ = ["AGE_BUCKETS_MS", "Histogram", "MESSAGE_BUCKETS", "MODEL_SIZE_BUCKETS", "MS_BUCKETS"]

# ModelMesh's buckets, so its histogram_quantile panels line up: MS_TIME_BUCKETS, AGE_HISTO, and the
# exponential size buckets (messages from 128 B, models from 256 KiB, both by 4, 8 buckets).
MS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 75, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 6e4, 1.2e5, 3e5)
AGE_BUCKETS_MS = tuple(minutes * 60_000 for minutes in (0.5, 5, 15, 60, 240, 720, 1440, 10080, 43200, 129600))
MESSAGE_BUCKETS = tuple(128 * 4**i for i in range(8))
MODEL_SIZE_BUCKETS = tuple(256 * 1024 * 4**i for i in range(8))


class _Series:
    __slots__ = ("counts", "sum")

    def __init__(self, slots: int) -> None:
        self.counts = [0] * slots  # the last slot is the +Inf overflow
        self.sum = 0.0


class Histogram:
    """One histogram family: a series per tuple of label values (`labels` names them; none: one series)."""

    __slots__ = ("name", "help", "unit", "bounds", "les", "labels", "_series", "_zeros")

    def __init__(self, name: str, help_text: str, bounds: tuple[float, ...], *, unit: str = "milliseconds",
                 labels: tuple[str, ...] = (), zeros: Callable[[], int] | None = None) -> None:
        """`zeros`: observations of 0 counted elsewhere as a plain int (cheaper than `observe(0)` on a hot
        path), added to the first bucket of the unlabelled series when scraped."""
        self.name = name
        self.help = help_text
        self.unit = unit
        self.bounds = bounds
        # repr(float) matches the Go-style ``le`` strings prometheus_client emits for bounds below 1e16.
        self.les = (*(repr(float(b)) for b in bounds), "+Inf")
        self.labels = labels
        # An unlabelled histogram is exported from the start, zeros and all, as prometheus_client's are.
        self._series: dict[tuple[str, ...], _Series] = {} if labels else {(): _Series(len(bounds) + 1)}
        self._zeros = zeros

    def observe(self, value: float, labels: tuple[str, ...] = ()) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series(len(self.bounds) + 1)
        # bisect_left puts a value equal to a bound in that bound's slot, matching Prometheus' ``le``.
        series.counts[bisect_left(self.bounds, value)] += 1
        series.sum += value

    def keep_only(self, position: int, kept: Container[str]) -> None:
        """Drop the series whose label at `position` is neither '' nor in `kept` (they stop being exported)."""
        for labels in [k for k in self._series if k[position] and k[position] not in kept]:
            del self._series[labels]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.help, unit=self.unit, labels=self.labels or None)
        for labels, found in self._series.items():
            counts = found.counts
            if self._zeros is not None and not labels:
                counts = [counts[0] + self._zeros(), *counts[1:]]
            buckets = list(zip(self.les, accumulate(counts), strict=True))
            family.add_metric(list(labels), buckets, found.sum)
        yield family
