"""ModelConfig for any model through any node: Triton's own for Triton models, derived for ONNX models.

An ONNX model's config is what Triton's auto-complete would make of it: the name, platform
`onnxruntime_onnx`, the inputs and outputs with their data types and dims, and `max_batch_size` when the
first dimension of every input is dynamic (then the dims leave it out), merged under the model's
`config.pbtxt` (storage.versions.read_config), or its config override when a load gave one (it replaces the
file, as in Triton): what the config says wins, the graph fills in what it does not.

Where the answer comes from, cheapest first, as metadata (serving.dataplane.model_metadata): a copy on
this node; a copy elsewhere (asked as a forwarded request, so it never loads there); the files alone when
the config.pbtxt of an ONNX model spells out its inputs and outputs; else a load here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as triton_pb

from meshnode.errors import ModelNotFound
from meshnode.mesh.state import MeshState
from meshnode.net.peers import GrpcPeers
from meshnode.runtimes.base import LoadedModel, TensorSpec
from meshnode.runtimes.onnx import PLATFORM as ONNX_PLATFORM
from meshnode.serving.cache import ModelCache
from meshnode.serving.replica import LocalReplica
from meshnode.serving.statistics import batches
from meshnode.state.registry import ModelRecord, Registry
from meshnode.storage.versions import read_config
from placement.types import LOADED
from router.errors import MeshError
from router.hop import Hop, Mode

ModelConfig = Any  # tritonclient's model_config_pb2.ModelConfig (tritonclient ships no types)
ONNX_RUNTIME = "onnxruntime"
# Triton's ONNX Runtime backend auto-completes a batching model's max_batch_size to this
# (`--backend-config=onnxruntime,default-max-batch-size=4`).
DEFAULT_MAX_BATCH_SIZE = 4


@runtime_checkable
class ConfiguredModel(Protocol):
    """A loaded model whose runtime keeps a config of its own (Triton's, auto-completed by Triton)."""

    async def model_config(self) -> ModelConfig: ...


def data_type(datatype: str) -> int:
    """KServe's datatype name (FP32, BYTES) as ModelConfig's DataType (TYPE_FP32, TYPE_STRING)."""
    return int(model_config_pb2.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"))


def derived(name: str, platform: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
            written: ModelConfig) -> ModelConfig:
    """The config a graph with these inputs and outputs implies, under what `written` (config.pbtxt) says."""
    config = model_config_pb2.ModelConfig()
    config.CopyFrom(written)
    config.name = config.name or name
    if not config.platform and not config.backend:
        config.platform = platform
    batching = batches(inputs)
    if not written.input and not written.output:  # the file leaves the tensors (and so the batching) to the graph
        config.max_batch_size = (written.max_batch_size or DEFAULT_MAX_BATCH_SIZE) if batching else 0
    skip = 1 if config.max_batch_size > 0 else 0
    if not written.input:
        config.input.extend(model_config_pb2.ModelInput(name=t.name, data_type=data_type(t.datatype),
                                                        dims=t.shape[skip:]) for t in inputs)
    if not written.output:
        config.output.extend(model_config_pb2.ModelOutput(name=t.name, data_type=data_type(t.datatype),
                                                          dims=t.shape[skip:]) for t in outputs)
    return config


def written_config(record: ModelRecord) -> ModelConfig:
    """The model's config override, else its config.pbtxt (empty for a model stored as a single file, or
    without one)."""
    storage = Path(record.storage)
    if record.config_override or storage.is_dir():
        return read_config(storage, record.config_override)
    return model_config_pb2.ModelConfig()


class ModelConfigs:
    def __init__(self, *, registry: Registry, cache: ModelCache, replica: LocalReplica, mesh: MeshState,
                 peers: GrpcPeers, alias_targets: Mapping[str, str]) -> None:
        self._registry = registry
        self._cache = cache
        self._replica = replica
        self._mesh = mesh
        self._peers = peers
        self._alias_targets = alias_targets  # alias -> model (meshnode.state.aliases keeps it current)

    async def config(self, name: str, version: str, forwarded: bool = False) -> ModelConfig:
        """The model's ModelConfig; for an alias, named as the alias (what requests are sent to)."""
        model = self._alias_targets.get(name)
        if model is not None:
            found = await self.config(model, version, forwarded)
            found.name = name
            return found
        record = self._registry.get(name)
        if record is None or not record.enabled:
            raise ModelNotFound.unknown(name)
        if not forwarded and not self._cache.has_entry(name, version):
            found = await self._from_elsewhere(name, version)
            if found is not None:
                return found
            written = written_config(record)
            if record.runtime != "triton" and written.input and written.output:
                return derived(name, ONNX_PLATFORM, (), (), written)
        entry = await self._replica.acquire(name, version)
        try:
            loaded = entry.model
            assert loaded is not None
            return await self._from_loaded(record, loaded)
        finally:
            self._cache.release(entry)

    async def _from_loaded(self, record: ModelRecord, loaded: LoadedModel) -> ModelConfig:
        if isinstance(loaded, ConfiguredModel):
            return await loaded.model_config()
        return derived(record.name, loaded.platform, loaded.inputs, loaded.outputs, written_config(record))

    async def _from_elsewhere(self, name: str, version: str) -> ModelConfig | None:
        view, live = self._mesh.model(name), self._mesh.nodes()
        if view is None:
            return None
        request = triton_pb.ModelConfigRequest(name=name, version=version)
        forwarded = Hop(hops=1, mode=Mode.COPY).to_metadata()
        for copy in view.copies:
            node = live.get(copy.instance_id)
            if (copy.state != LOADED or node is None or node.shutting_down or node.instance_id == self._mesh.instance_id
                    or (version and copy.versions and version not in copy.versions)):
                continue
            try:
                return (await self._peers.ask(node, "ModelConfig", request, forwarded)).config
            except MeshError:
                continue  # any copy answers as well as another
        return None
