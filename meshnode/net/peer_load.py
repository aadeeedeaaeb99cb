"""What this node knows of its peers' load: its calls outstanding to each, and the peers it suspects.

Both kinds of forward change it: the event loop's (net.peers) and the threaded server's polling threads'
(net.threaded_peers), so changes are made under a lock. Reads are single dict lookups, which need none: the
router reads a count per copy it considers.

A peer that fails to answer (connection refused, reset mid-request) is a suspect for SUSPECT_S, so that
concurrent requests stop choosing it before its lease has even expired.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

SUSPECT_S = 3.0


class PeerLoad:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._now = clock
        self._lock = threading.Lock()
        self._outstanding: dict[str, int] = {}
        self._suspect_until: dict[str, float] = {}

    def outstanding(self) -> Mapping[str, int]:
        return self._outstanding

    def started(self, peer: str) -> None:
        with self._lock:
            self._outstanding[peer] = self._outstanding.get(peer, 0) + 1

    def ended(self, peer: str) -> int:
        """The calls still outstanding to `peer` after this one. The peer may have been forgotten (its lease
        ended) while calls were out: its count is gone at zero."""
        with self._lock:
            left = self._outstanding.get(peer, 0) - 1
            if left > 0:
                self._outstanding[peer] = left
            else:
                self._outstanding.pop(peer, None)
            return max(left, 0)

    def suspect(self, peer: str) -> None:
        with self._lock:
            self._suspect_until[peer] = self._now() + SUSPECT_S

    def clear(self, peer: str) -> None:
        with self._lock:
            self._suspect_until.pop(peer, None)

    def suspects(self) -> frozenset[str]:
        if not self._suspect_until:
            return frozenset()
        now = self._now()
        with self._lock:
            for peer in [p for p, until in self._suspect_until.items() if until <= now]:
                del self._suspect_until[peer]
            return frozenset(self._suspect_until)
