"""Watching this node's runtime, and leaving and rejoining the mesh's serving with it.

While the runtime does not answer (a Triton killed or unreachable), the node keeps its port and routes
every request it receives to a copy elsewhere or to a load on another node; meanwhile it
- withdraws its copies: the cache forgets them, and the copy flusher removes them from their records,
  so no peer routes here;
- publishes that it cannot load (NodeView.runtime_down), so placement chooses other nodes;
- refuses loads here (serving.runtime_status), so a request that arrives first goes elsewhere at once;
- answers NOT_SERVING for the runtime on the gRPC health service.
When the runtime answers again, whatever it still holds is cleared (the cache starts empty again, so its
accounting is what the runtime really holds), recent load failures are forgotten, and the node rejoins.
"""

from __future__ import annotations

import logging

from meshnode.background import Periodic
from meshnode.net.health import Health
from meshnode.runtimes.base import Runtime
from meshnode.serving.cache import ModelCache
from meshnode.serving.runtime_status import RuntimeStatus
from meshnode.state.instances import InstancePublisher
from router.errors import MeshError

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.5
# A runtime busy with a big load may miss one probe: two in a row (about a second) mean it is gone.
MISSES_TO_DOWN = 2


class RuntimeHealth:
    def __init__(self, *, runtime: Runtime, cache: ModelCache, status: RuntimeStatus, publisher: InstancePublisher,
                 health: Health, interval_s: float = CHECK_INTERVAL_S, misses_to_down: int = MISSES_TO_DOWN) -> None:
        self._runtime = runtime
        self._cache = cache
        self._status = status
        self._publisher = publisher
        self._health = health
        self._misses_to_down = misses_to_down
        self._misses = 0
        self._checks = Periodic("runtime-health", interval_s, self.check)

    def start(self) -> None:
        self._checks.start()

    async def stop(self) -> None:
        await self._checks.stop()

    async def check(self) -> None:
        if await self._runtime.healthy():
            self._misses = 0
            if not self._status.up:
                await self._rejoin()
            return
        self._misses += 1
        if self._status.up and self._misses >= self._misses_to_down:
            await self._withdraw()

    async def _withdraw(self) -> None:
        self._status.down_reason = f"its runtime ({self._runtime.name}) does not answer"
        forgotten = self._cache.forget_all()
        log.warning("runtime %s does not answer: %d copies withdrawn, requests go to other nodes",
                    self._runtime.name, forgotten)
        await self._health.runtime(False)
        await self._publisher.publish_now()

    async def _rejoin(self) -> None:
        try:
            await self._runtime.start()  # clears what it holds: the cache knows of nothing there now
        except MeshError as error:
            log.warning("runtime %s answers but could not be reset yet: %s", self._runtime.name, error)
            return
        self._cache.clear_failures()
        self._status.down_reason = None
        log.info("runtime %s answers again: the node takes copies and loads again", self._runtime.name)
        await self._health.runtime(True)
        await self._publisher.publish_now()
