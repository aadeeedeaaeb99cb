"""An in-memory etcd for the node's parts: FakeStore and its watches.

FakeStore implements the EtcdStore methods the state classes call (reads, compare-and-set writes,
transactions, snapshots, watches) over a dict with etcd's revisions, so the real Registry, Aliases
and WatchedPrefix run on it. Several "nodes" may share one FakeStore as they share one etcd.

Nothing here sleeps for a fixed time: a test waits for what it expects with FakeStore.settle.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from meshnode.etcd.store import EtcdStore, encode
from meshnode.etcd.types import Entry, EtcdConflict, EtcdUnavailable, Lease, WatchEvent
from meshnode.state.instances import PREFIX as INSTANCES
from meshnode.state.instances import encode_node
from placement.types import NodeView
from tests.unit.meshnode.fakes import WAIT_S, Log


@dataclass(eq=False)
class _Watch:
    prefix: str
    queue: asyncio.Queue[WatchEvent] = field(default_factory=asyncio.Queue)
    idle: bool = False  # its consumer handled every event and asked for the next


class FakeStore:
    """One in-memory etcd: keys with mod revisions, one revision counter, history for watches.

    `down` makes every call fail as EtcdStore does after its retry window. `interleave(key, write)` runs
    `write` once inside the next update of `key`, between its read and its write: another node's write
    winning the compare-and-set race.
    """

    def __init__(self) -> None:
        self.revision = 1
        self.data: dict[str, tuple[bytes, int]] = {}
        self.history: list[WatchEvent] = []
        self.writes = 0
        self.highest_revision = 0
        self.conflicts = 0  # compare-and-set rounds an update lost
        self.down = False
        self.refusals: Log[str] = Log()  # calls refused while down
        self._interleaved: dict[str, Callable[[], Awaitable[object]]] = {}
        self._watches: list[_Watch] = []
        self._quiet = asyncio.Event()

    @property
    def etcd(self) -> EtcdStore:
        """This fake where the parts' signatures say EtcdStore."""
        return cast(EtcdStore, self)

    # -- test helpers --

    def publish(self, *nodes: NodeView) -> None:
        """Nodes join the mesh: their instance records, as InstancePublisher writes them."""
        for view in nodes:
            self._write(INSTANCES + view.instance_id, encode_node(view))

    def leave(self, instance_id: str) -> None:
        """A node's lease ended: its instance record goes."""
        self._write(INSTANCES + instance_id, None)

    def interleave(self, key: str, write: Callable[[], Awaitable[object]]) -> None:
        self._interleaved[key] = write

    def record(self, key: str) -> dict[str, Any]:
        """The JSON record etcd holds at `key` (which must be there)."""
        return cast(dict[str, Any], json.loads(self.data[key][0]))

    def values_written(self, key: str) -> list[dict[str, Any] | None]:
        """Every value `key` was set to, oldest first (None: deleted)."""
        return [json.loads(e.value) if e.type == "put" else None for e in self.history if e.key == key]

    async def settle(self, timeout: float = WAIT_S) -> None:  # noqa: ASYNC109
        """Until every watch delivered every event and its consumer came back for the next one."""
        await asyncio.sleep(0)  # a watch task created just now registers on its first step
        async with asyncio.timeout(timeout):
            while not all(w.idle for w in self._watches):
                self._quiet.clear()
                await self._quiet.wait()

    # -- the EtcdStore methods the state classes use --

    def _check(self) -> None:
        if self.down:
            self.refusals.append("refused")
            raise EtcdUnavailable("etcd at fake:2379 unavailable for 5 s (fake outage)")

    def _mod(self, key: str) -> int:
        found = self.data.get(key)
        return 0 if found is None else found[1]

    def _write(self, key: str, value: bytes | None) -> int:
        return self._write_all({key: value})

    def _write_all(self, values: Mapping[str, bytes | None]) -> int:
        self.revision += 1
        self.writes += 1
        for key, value in values.items():
            if value is None:
                self.data.pop(key, None)
                event = WatchEvent("delete", key, b"", self.revision)
            else:
                self.data[key] = (value, self.revision)
                event = WatchEvent("put", key, value, self.revision)
            self.history.append(event)
            for watch in self._watches:
                if key.startswith(watch.prefix):
                    watch.queue.put_nowait(event)
                    watch.idle = False
        self.highest_revision = self.revision
        return self.revision

    async def get(self, key: str) -> tuple[bytes, int] | None:
        self._check()
        return self.data.get(key)

    async def put(self, key: str, value: object, lease: Lease | None = None) -> int:
        self._check()
        return self._write(key, encode(value))

    async def delete(self, key: str) -> int | None:
        self._check()
        return None if key not in self.data else self._write(key, None)

    async def create(self, key: str, value: object, lease: Lease | None = None) -> int | None:
        self._check()
        return None if key in self.data else self._write(key, encode(value))

    async def compare_and_put(self, key: str, value: object, expected_mod_revision: int,
                              lease: Lease | None = None) -> int | None:
        self._check()
        return self._write(key, encode(value)) if self._mod(key) == expected_mod_revision else None

    async def commit(self, puts: Mapping[str, object], unchanged: Mapping[str, int],
                     present: Sequence[str] = ()) -> int | None:
        self._check()
        if any(self._mod(k) != revision for k, revision in unchanged.items()) or any(
                k not in self.data for k in present):
            return None
        return self._write_all({k: encode(v) for k, v in puts.items()})

    async def update(self, key: str, fn: Callable[[bytes | None], bytes | None], attempts: int = 1000,
                     lease: Lease | None = None) -> bytes | None:
        return (await self.update_versioned(key, fn, attempts, lease))[0]

    async def update_versioned(self, key: str, fn: Callable[[bytes | None], bytes | None], attempts: int = 1000,
                               lease: Lease | None = None) -> tuple[bytes | None, int]:
        self._check()
        current = self.data.get(key)
        interleaved = self._interleaved.pop(key, None)
        if interleaved is not None:
            await interleaved()
        for _ in range(attempts):
            old, revision = current if current is not None else (None, 0)
            new = fn(old)
            if new == old:
                return old, revision
            if self._mod(key) == revision:
                return new, self._write(key, new)
            self.conflicts += 1
            current = self.data.get(key)  # a failed transaction brings the winner's value
        raise EtcdConflict(f"update of {key} lost the compare-and-set race {attempts} times")

    async def snapshot_prefix(self, key_prefix: str) -> tuple[list[Entry], int]:
        self._check()
        entries = [Entry(k, v, rev) for k, (v, rev) in sorted(self.data.items()) if k.startswith(key_prefix)]
        return entries, self.revision

    async def snapshot_pages(self, key_prefix: str) -> AsyncIterator[tuple[list[Entry], int]]:
        yield await self.snapshot_prefix(key_prefix)

    def watch_prefix(self, key_prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        return self._follow(key_prefix, start_revision)

    async def _follow(self, key_prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        self._check()
        watch = _Watch(key_prefix)
        for event in self.history:
            if event.mod_revision >= start_revision and event.key.startswith(key_prefix):
                watch.queue.put_nowait(event)
        self._watches.append(watch)
        try:
            while True:
                if watch.queue.empty():
                    watch.idle = True
                    self._quiet.set()
                event = await watch.queue.get()
                yield event
        finally:
            self._watches.remove(watch)

    async def close(self) -> None:
        pass
