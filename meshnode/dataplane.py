"""The node's transport-neutral core: inference, readiness, metadata.

Servicers only convert and call in here. The hit path of `infer` is a dict lookup, the model's
own infer, and two counter updates; registry and disk are consulted only on a miss.
"""

from __future__ import annotations

import time
from pathlib import Path

from meshnode.cache import CachedModel, ModelCache
from meshnode.errors import ModelNotFound
from meshnode.metrics import NodeMetrics
from meshnode.registry import Registry
from meshnode.repository import list_versions, model_source
from meshnode.runtimes.base import Runtime
from meshpb import pb

SERVER_NAME = "meshserve"
SERVER_EXTENSIONS = ("model_repository", "model_repository(unload_dependents)", "parameters")


class DataPlane:
    def __init__(
        self, *, registry: Registry, cache: ModelCache, runtime: Runtime, metrics: NodeMetrics, version: str
    ) -> None:
        self._registry = registry
        self._cache = cache
        self._runtime = runtime
        self._metrics = metrics
        self._version = version
        self.ready = False

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        started = time.perf_counter()
        metrics = self._metrics
        entry = self._cache.ready.get((request.model_name, request.model_version))
        try:
            if entry is None:
                entry = await self.acquire(request.model_name, request.model_version)
            else:
                entry.inflight += 1
                metrics.cache_hits += 1
            try:
                return await entry.model.infer(request)  # type: ignore[union-attr]
            finally:
                self._cache.release(entry)
        except BaseException:
            metrics.invoke_failures += 1
            raise
        finally:
            metrics.invoke_count += 1
            metrics.observe_invoke_ms((time.perf_counter() - started) * 1000.0)

    async def acquire(self, name: str, version: str) -> CachedModel:
        """A loaded entry for the model (loading it here if needed); the caller releases it."""
        record = self._registry.get(name)
        if record is None or not record.enabled:
            raise ModelNotFound.unknown(name)
        source = model_source(name, Path(record.storage), version)
        predicted = record.size_hint or self._runtime.predict_size(source)
        return await self._cache.acquire(source, version, predicted)

    def model_ready(self, name: str, version: str) -> bool:
        """True when a request for the model would be served now: loaded, or loadable on demand."""
        if (name, version) in self._cache.ready:
            return True
        record = self._registry.get(name)
        if record is None or not record.enabled:
            return False
        versions = list_versions(Path(record.storage))
        wanted = version or (versions[-1] if versions else "")
        return wanted in versions and not self._cache.has_failure(name, wanted)

    async def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        entry = await self.acquire(name, version)
        try:
            model = entry.model
            assert model is not None
            record = self._registry.get(name)
            versions = list_versions(Path(record.storage)) if record else [model.version]
            return pb.ModelMetadataResponse(
                name=name,
                versions=versions,
                platform=model.platform,
                inputs=[_tensor_metadata(t) for t in model.inputs],
                outputs=[_tensor_metadata(t) for t in model.outputs],
            )
        finally:
            self._cache.release(entry)

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=SERVER_EXTENSIONS)


def _tensor_metadata(spec: object) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=spec.shape  # type: ignore[attr-defined]
    )
