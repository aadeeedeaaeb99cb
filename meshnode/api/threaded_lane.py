"""The node's gRPC ports on grpcio's threaded server (--grpc-server threaded), as one part of the node.

ModelInfer is taken off each server's C core by polling threads (net.direct_calls, api.direct): a local hit is
answered there (serving.threaded_hits), and so is a client's request that a peer's loaded copy serves
(serving.threaded_forwards, over net.threaded_peers). Every other call, and whatever those do not take, runs on
the event loop (api.threaded).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from meshnode.api.access import Access
from meshnode.api.direct import DirectInfer
from meshnode.api.threaded import INFER, ThreadedServices
from meshnode.net import transport
from meshnode.net.direct_calls import DirectCalls
from meshnode.net.threaded_peers import ThreadedPeers
from meshnode.serving.threaded_forwards import ThreadedForwards
from meshnode.serving.threaded_hits import ThreadedHits


class ThreadedLane:
    def __init__(self, *, hits: ThreadedHits, forwards: ThreadedForwards, peers: ThreadedPeers, threads: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        """`threads`: each server's worker threads, and the most polling threads its ModelInfer may have."""
        self.hits = hits
        self._forwards = forwards
        self._peers = peers
        self._threads = threads
        self._loop = loop
        self._direct: list[DirectCalls] = []

    def server(self) -> grpc.Server:
        return transport.create_threaded_server(self._threads)

    def handlers(self, server: grpc.Server, access: Access,
                 handlers: Mapping[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
        """The coroutine handlers, admitted on the worker thread; ModelInfer's, taken off the C core (api.direct)."""
        if (infer := handlers.get(INFER)) is not None:
            self._direct.append(transport.serve_directly(server, INFER, DirectInfer(
                loop=self._loop, access=access, hits=self.hits, forwards=self._forwards, handler=infer),
                self._threads))
        return ThreadedServices(loop=self._loop, access=access, hits=self.hits).handlers(handlers)

    def start(self) -> None:
        """Once the servers have started."""
        for direct in self._direct:
            direct.start()

    def forget(self, instance_id: str) -> None:
        """The peer left the mesh."""
        self._peers.forget(instance_id)

    async def stop(self) -> None:
        """Once the servers have stopped, which ended their calls."""
        for direct in self._direct:
            await asyncio.to_thread(direct.stop)
        self._peers.close()
