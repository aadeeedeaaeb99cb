"""Failed loads on this node, each kept for a backoff so a broken model is not retried in a loop.

Keyed by model name, then version, so lookups by name do not scan other models' failures.
"""

from __future__ import annotations

from collections.abc import Callable

from meshnode.errors import ModelUnavailable
from meshnode.state.registry import Failure
from router.errors import MeshError


class LoadFailures:
    def __init__(self, backoff_s: float, clock: Callable[[], float]) -> None:
        self._backoff_s = backoff_s
        self._now = clock
        self._by_name: dict[str, dict[str, tuple[float, MeshError]]] = {}  # name -> version -> failure

    def record(self, name: str, version: str, error: MeshError) -> None:
        self._by_name.setdefault(name, {})[version] = (self._now(), error)

    def check(self, name: str, version: str) -> None:
        """Raise ModelUnavailable while the version's last failure is within its backoff."""
        failure = self._by_name.get(name, {}).get(version)
        if failure is None:
            return
        remaining = failure[0] + self._backoff_s - self._now()
        if remaining > 0:
            raise ModelUnavailable(f"{failure[1]} (not retried on this node for another {remaining:.0f}s)")
        self._forget(name, version)

    def active(self, name: str, version: str) -> bool:
        failure = self._by_name.get(name, {}).get(version)
        return failure is not None and failure[0] + self._backoff_s > self._now()

    def newest(self, name: str) -> Failure | None:
        """The newest unexpired failure of any version of `name`, as model records keep it."""
        cutoff = self._now() - self._backoff_s
        live = [f for f in self._by_name.get(name, {}).values() if f[0] > cutoff]
        if not live:
            return None
        at, error = max(live, key=lambda f: f[0])
        return Failure(at=at, message=str(error))

    def clear(self, name: str) -> None:
        self._by_name.pop(name, None)

    def clear_all(self) -> list[str]:
        """The runtime was reset: what failed in it before says nothing about loads now. Returns the names."""
        names = list(self._by_name)
        self._by_name.clear()
        return names

    def count(self) -> int:
        cutoff = self._now() - self._backoff_s
        return sum(1 for versions in self._by_name.values() for at, _ in versions.values() if at > cutoff)

    def _forget(self, name: str, version: str) -> None:
        versions = self._by_name.get(name)
        if versions is not None:
            versions.pop(version, None)
            if not versions:
                del self._by_name[name]
