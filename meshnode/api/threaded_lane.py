"""The node's gRPC ports on grpcio's threaded server (--grpc-server threaded), as one part of the node.

ModelInfer is taken off each server's C core by polling threads (net.direct_calls, api.direct): a local hit is
answered there (serving.threaded_hits), and so is a client's request that a peer's loaded copy serves
(serving.threaded_forwards, over net.threaded_peers). So is ModelStreamInfer, by the same threads
(net.direct_streams, api.direct_stream): they read and write its messages, and its handler runs on the event loop.
Every other call, and whatever those do not take, runs on the event loop (api.threaded).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from meshnode.api.access import Access
from meshnode.api.direct import DirectInfer
from meshnode.api.direct_stream import DirectStreamInfer
from meshnode.api.threaded import ThreadedServices
from meshnode.net import transport
from meshnode.net.direct_calls import DirectCalls
from meshnode.net.threaded_peers import ThreadedPeers
from meshnode.serving.dataplane import INFER, STREAM_INFER
from meshnode.serving.threaded_forwards import ThreadedForwards
from meshnode.serving.threaded_hits import ThreadedHits


class ThreadedLane:
    def __init__(self, *, hits: ThreadedHits, forwards: ThreadedForwards, peers: ThreadedPeers, threads: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        """`threads`: each server's worker threads, and the most polling threads its direct methods may have."""
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
        """The coroutine handlers, admitted on the worker thread; ModelInfer's and ModelStreamInfer's, taken off the
        C core (api.direct, api.direct_stream)."""
        if (infer := handlers.get(INFER)) is not None:
            stream = handlers.get(STREAM_INFER)
            streams = {} if stream is None else {STREAM_INFER: DirectStreamInfer(
                loop=self._loop, access=access, hits=self.hits, handler=stream)}
            self._direct.append(transport.serve_directly(server, INFER, DirectInfer(
                loop=self._loop, access=access, hits=self.hits, forwards=self._forwards, handler=infer),
                self._threads, streams))
        return ThreadedServices(loop=self._loop, access=access, hits=self.hits).handlers(handlers)

    def start(self) -> None:
        """Once the servers have started."""
        for direct in self._direct:
            direct.start()

    def forget(self, instance_id: str) -> None:
        """The peer left the mesh."""
        self._peers.forget(instance_id)

    async def stop(self) -> None:
        """Once the servers have stopped, which ended their calls: the forwards still out end with them, so that
        the pollers waiting in them are free to end."""
        self._peers.close()
        for direct in self._direct:
            await asyncio.to_thread(direct.stop)
