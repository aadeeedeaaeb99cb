"""gRPC's standard health service (grpc.health.v1) on a node's server, of either kind (net.transport)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from meshpb import INFERENCE_SERVICE, MANAGEMENT_SERVICE


class Health:
    """What Kubernetes' gRPC probes and load balancers ask: NOT_SERVING until the node is ready, SERVING, then
    NOT_SERVING from the start of a drain. Answers for the whole server ("") and for each of its services by
    name, and for the node's runtime (RUNTIME_SERVICE): NOT_SERVING while the runtime is down, when the node
    still routes every request elsewhere, so the port and the rest stay SERVING."""

    RUNTIME_SERVICE = "meshserve.Runtime"
    SERVICES = ("", INFERENCE_SERVICE, MANAGEMENT_SERVICE, RUNTIME_SERVICE)

    def __init__(self, server: grpc.aio.Server | grpc.Server) -> None:
        # grpc.aio's servicer answers on the loop; grpcio's own (thread-safe) on the threaded server's workers.
        self._aio: health_aio.HealthServicer | None = None
        self._threaded: health.HealthServicer | None = None
        if isinstance(server, grpc.aio.Server):
            self._aio = health_aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._aio, server)
        else:
            self._threaded = health.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._threaded, server)

    async def _set(self, service: str, status: int) -> None:
        if self._aio is not None:
            await self._aio.set(service, status)
        elif self._threaded is not None:
            self._threaded.set(service, status)

    async def serving(self) -> None:
        for service in self.SERVICES:
            await self._set(service, health_pb2.HealthCheckResponse.SERVING)

    async def draining(self) -> None:
        if self._aio is not None:
            await self._aio.enter_graceful_shutdown()
        elif self._threaded is not None:
            self._threaded.enter_graceful_shutdown()

    async def runtime(self, up: bool) -> None:
        """The runtime's own status (ignored once draining: then everything is NOT_SERVING)."""
        await self._set(self.RUNTIME_SERVICE,
                        health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING)
