"""The node's /metrics HTTP endpoint: a minimal GET-only listener on the node's event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from meshnode.observability.metrics import NodeMetrics, NodeState

__all__ = ["MetricsServer", "serve_metrics"]

_log = logging.getLogger(__name__)

_READ_TIMEOUT_S = 5.0
_MAX_REQUEST_HEAD = 8192


class MetricsServer:
    """A bound /metrics listener on the running event loop."""

    def __init__(self, server: asyncio.Server, connections: set[asyncio.Task[None]]) -> None:
        self._server = server
        self._connections = connections
        self.port: int = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()


async def serve_metrics(metrics: NodeMetrics, host: str, port: int,
                        state: Callable[[], NodeState] | None = None) -> MetricsServer:
    """Serve ``GET /metrics`` on host:port (0 picks a free port, see ``.port``); `state` is read once
    per scrape (it may walk every model record).

    Runs on the caller's loop: a render is pure Python, which a thread would not take off the loop
    under the GIL anyway, and staying on the loop keeps scrapes race-free with the hot path.
    """
    connections: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # asyncio runs stream callbacks inside a task
        connections.add(task)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            writer.write(_respond(metrics, state, head))
            await asyncio.wait_for(writer.drain(), _READ_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # the peer stalled, vanished or sent an oversized head: not a scraper worth answering
        finally:
            connections.discard(task)
            writer.close()

    server = await asyncio.start_server(handle, host, port, limit=_MAX_REQUEST_HEAD)
    return MetricsServer(server, connections)


def _respond(metrics: NodeMetrics, state: Callable[[], NodeState] | None, head: bytes) -> bytes:
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _response("400 Bad Request", b"bad request\n")
    if parts[0] != b"GET" or parts[1].split(b"?", 1)[0] != b"/metrics":
        return _response("404 Not Found", b"not found\n")
    try:
        return _response("200 OK", metrics.render(state() if state is not None else None), CONTENT_TYPE_PLAIN_0_0_4)
    except Exception:
        # A broken state source must cost one scrape, not the endpoint.
        _log.exception("rendering /metrics failed")
        return _response("500 Internal Server Error", b"render failed\n")


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return (head + "Connection: close\r\n\r\n").encode("ascii") + body
