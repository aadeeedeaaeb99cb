"""Smoothed load figures a node publishes in its instance record.

Published values decide placement on other nodes, and each change that matters costs an etcd write:
raw samples swing too much for either.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RequestRate:
    """Requests per second, smoothed over about ten seconds, from a growing counter."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._now = clock
        self._count = 0
        self._at = clock()
        self.rate = 0.0

    def update(self, count: int) -> float:
        now = self._now()
        elapsed = now - self._at
        if elapsed >= 0.2:
            alpha = min(1.0, elapsed / 10.0)
            self.rate += alpha * ((count - self._count) / elapsed - self.rate)
            self._count, self._at = count, now
        return round(self.rate, 1)


class Smoothed:
    """An in-flight count averaged over a few seconds: at full load it swings 0..N between samples,
    and publishing every swing would spend the instance record's write budget on noise."""

    def __init__(self, alpha: float = 0.1) -> None:
        self._alpha = alpha
        self._value = 0.0

    def update(self, sample: int) -> int:
        self._value += self._alpha * (sample - self._value)
        return round(self._value)
