"""Triton Inference Server beside the node, in explicit model-control mode, as the node's runtime.

Control (load, unload, metadata, config, repository index) goes through tritonclient.grpc.aio; inference
is passed through untouched: the request the node already parsed is sent on one shared channel of our
own (meshnode.net.transport) and Triton's response message is returned as it came, so each request costs one
more serialize and parse and no tensor is decoded.

Triton holds the versions of a model name as one model: the node keeps, per name, the versions its cache
loaded, and every load or unload of one version asks Triton for exactly the set held (a `specific`
version_policy in the config it sends), so Triton serves versions side by side and unloads one alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import tritonclient.grpc.aio as triton_aio
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from meshnode.errors import (
    DeadlineExceeded,
    Internal,
    InvalidInput,
    LoadFailed,
    ModelLost,
    ModelUnavailable,
)
from meshnode.net import transport
from meshnode.runtimes.base import (
    CallerMetadata,
    InferStream,
    LoadedModel,
    ResponseSink,
    RuntimeSettings,
    TensorSpec,
)
from meshnode.runtimes.triton_calls import VersionStream, trace_metadata
from meshnode.storage.repository import ModelSource, directory_files, files_bytes
from meshnode.storage.versions import CONFIG_FILE, only, read_config
from meshpb import pb
from router.errors import MeshError

log = logging.getLogger(__name__)

# Resident bytes a loaded model costs beyond its files, by Triton backend. Measured as the RSS of the
# tritonserver process and all its children (ps) before and after a load, Triton 2.51 from nvidia-pytriton
# 0.7.0 on CPU: a numpy-only Python-backend model +44.5 MB and +42.0 MB (its stub process, ~37 MB of which
# unloading gives back, plus the server's own bookkeeping); a Python-backend model that imports onnxruntime
# and runs a 1 MB MLP +78 MB, the extra being what its model.py imports, which no config reveals: give such
# models a size_hint. Only the Python backend ships in that package, so other backends are unmeasured
# here and get ONNX Runtime's in-process factor (meshnode.runtimes.onnx.PREDICT_FACTOR) on their files.
BACKEND_OVERHEAD_BYTES = {"python": 44 * 2**20}
UNMEASURED_FILE_FACTOR = 1.6
# After Triton's unload returns, the model stays UNLOADING for ~0.7 s; a reload polls that long.
UNLOAD_POLL_S = 0.05
UNLOAD_WAIT_S = 30.0
START_WAIT_S = 60.0  # for Triton to answer when the node starts
PROBE_TIMEOUT_S = 2.0
NOT_READY = "is not at ready state"  # Triton's words for a request to a version it does not hold
CONTROL_TIMEOUT_S = 600.0  # a load may run that long; the cache's own load timeout is the real bound


def _first_paragraph(message: str) -> str:
    # Python-backend load errors carry a traceback after a blank line; the first paragraph says what failed.
    return message.strip().split("\n\n", 1)[0].strip()


@dataclass(frozen=True, slots=True)
class _Upload:
    config: str
    files: dict[str, bytes]


class TritonModel:
    """A model loaded in Triton; `infer` forwards the protocol message as it is."""

    def __init__(self, runtime: TritonRuntime, source: ModelSource, metadata: Any, size_bytes: int) -> None:
        self.name = source.name
        self.version = source.version
        self.platform: str = metadata.platform
        self.inputs = tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in metadata.inputs)
        self.outputs = tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in metadata.outputs)
        self.size_bytes = size_bytes
        self.source = source
        self._runtime = runtime

    async def infer(self, request: pb.ModelInferRequest, timeout_s: float | None = None,
                    caller_metadata: CallerMetadata | None = None) -> pb.ModelInferResponse:
        # Triton may hold other versions of the name: without this it would answer with its newest.
        request.model_version = self.version
        try:
            response: pb.ModelInferResponse = await self._runtime.stub.ModelInfer(
                request, timeout=timeout_s, metadata=trace_metadata(caller_metadata))
        except grpc.aio.AioRpcError as error:
            raise self._runtime.infer_error(self.name, error) from None
        return response

    def open_stream(self, sink: ResponseSink, caller_metadata: CallerMetadata | None = None) -> InferStream:
        """One ModelStreamInfer call to Triton, passed through: Triton's own responses (a decoupled model's
        many, its final-response flags, its errors) reach the sink as Triton sends them."""
        call = self._runtime.stub.ModelStreamInfer(metadata=trace_metadata(caller_metadata))
        return VersionStream(call, sink, self._stream_failed, self.version)

    def _stream_failed(self, error: grpc.aio.AioRpcError) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(error_message=str(self._runtime.infer_error(self.name, error)))

    async def model_config(self) -> Any:
        """Triton's own config of this model (auto-completed by Triton), for ModelConfig (api.config)."""
        try:
            return (await self._runtime.client.get_model_config(self.name, self.version,
                                                                client_timeout=CONTROL_TIMEOUT_S)).config
        except InferenceServerException as error:
            raise ModelUnavailable(f"model '{self.name}': {self._runtime._control_message(error)}") from None


class TritonRuntime:
    name = "triton"

    def __init__(self, url: str, triton_repository: Path | None = None) -> None:
        self.url = url
        # Models stored in Triton's own repository load by name; any other storage is uploaded.
        self._triton_repository = triton_repository.resolve() if triton_repository is not None else None
        self._client: triton_aio.InferenceServerClient | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: transport.InferenceStub | None = None
        # Loads and unloads of one name run one at a time, and only the latest load of a version may unload it.
        self._locks: dict[str, asyncio.Lock] = {}
        self._held: dict[str, dict[str, TritonModel]] = {}  # name -> version -> what Triton serves for it
        self._unloaded: set[str] = set()

    # Created on first use, inside the node's event loop, which gRPC's aio objects belong to.
    @property
    def client(self) -> triton_aio.InferenceServerClient:
        if self._client is None:
            self._client = triton_aio.InferenceServerClient(self.url)
        return self._client

    @property
    def stub(self) -> transport.InferenceStub:
        if self._stub is None:
            self._channel = transport.create_channel(self.url)
            self._stub = transport.InferenceStub(self._channel)
        return self._stub

    async def start(self) -> None:
        """Wait for Triton (a sidecar may start after the node), then unload every model it holds: the
        node's cache starts empty, and models an earlier node left would hold memory nobody counts."""
        deadline = time.monotonic() + START_WAIT_S
        while True:
            try:
                index = await self.client.get_model_repository_index(client_timeout=PROBE_TIMEOUT_S)
                break
            except InferenceServerException as error:
                if time.monotonic() > deadline:
                    raise Internal(f"Triton at {self.url} did not answer within {START_WAIT_S:g} s: "
                                         f"{self._control_message(error)}") from None
                await asyncio.sleep(PROBE_TIMEOUT_S / 4)
        leftovers = sorted({m.name for m in index.models if m.state == "READY"})
        for name in leftovers:
            await self.client.unload_model(name, client_timeout=CONTROL_TIMEOUT_S)
        self._unloaded.update(leftovers)
        if leftovers:
            log.info("unloaded %d models left on Triton at %s: %s", len(leftovers), self.url, ", ".join(leftovers))

    async def healthy(self) -> bool:
        # Live, not ready: with strict readiness (its default) Triton is not ready while a model loads.
        try:
            return bool(await self.client.is_server_live(client_timeout=PROBE_TIMEOUT_S))
        except InferenceServerException:
            return False

    def predict_size(self, source: ModelSource) -> int:
        try:
            files = files_bytes(source)
        except OSError:
            files = 0
        return max(files + max(BACKEND_OVERHEAD_BYTES.values()), int(files * UNMEASURED_FILE_FACTOR))

    async def load(self, source: ModelSource) -> TritonModel:
        name, version = source.name, source.version
        where = f"model '{name}' version {version} on Triton at {self.url}"
        if not source.directory.name.isdigit():
            raise LoadFailed(f"failed to load {where}: Triton needs a model directory (NAME/VERSION/...), "
                             f"not the single file {source.model_file}")
        async with self._locks.setdefault(name, asyncio.Lock()):
            held = self._held.get(name, {})
            try:
                files = files_bytes(source)
                request = self._load_request(source, sorted({*held, version}, key=int))
            except (OSError, ValueError) as error:
                raise LoadFailed(f"failed to load {where}: {error}") from None
            if name in self._unloaded:
                await self._wait_unloaded(name)
            try:
                await self.client.load_model(name, config=request.config, files=request.files or None,
                                             client_timeout=CONTROL_TIMEOUT_S)
                metadata = await self.client.get_model_metadata(name, version, client_timeout=CONTROL_TIMEOUT_S)
                config = (await self.client.get_model_config(name, client_timeout=CONTROL_TIMEOUT_S)).config
            except InferenceServerException as error:
                if error.status() == str(grpc.StatusCode.UNAVAILABLE):
                    # Triton is gone, not the model broken: UNAVAILABLE, which a forwarding node retries elsewhere.
                    raise ModelUnavailable(f"failed to load {where}: {self._control_message(error)}") from None
                raise LoadFailed(f"failed to load {where}: {self._control_message(error)}") from None
            self._unloaded.discard(name)
            overhead = BACKEND_OVERHEAD_BYTES.get(config.backend or config.platform)
            size = files + overhead if overhead is not None else int(files * UNMEASURED_FILE_FACTOR)
            model = TritonModel(self, source, metadata, size)
            self._held.setdefault(name, {})[version] = model
            return model

    def _load_request(self, source: ModelSource, versions: list[str]) -> _Upload:
        """Triton's load of `source`'s model holding exactly `versions`: its config (the model's config override,
        as Triton's own clients send one, else its config.pbtxt; named as registered, with a specific
        version_policy), and the versions' files unless Triton's own repository has them."""
        model_dir = source.directory.parent
        config = only(read_config(model_dir, source.config_override), versions)
        config.name = source.name  # a copy stored under another name keeps the config's old one
        files: dict[str, bytes] = {}
        if not self._in_triton_repository(model_dir, source.name):
            for version in versions:
                files |= {f"file:{version}/{p.relative_to(model_dir / version).as_posix()}": p.read_bytes()
                          for p in directory_files(model_dir / version)}
            # Other top-level files (labels, ...) belong to every version.
            files |= {f"file:{p.name}": p.read_bytes()
                      for p in model_dir.iterdir() if p.is_file() and p.name != CONFIG_FILE}
        return _Upload(json_format.MessageToJson(config), files)

    def _in_triton_repository(self, model_dir: Path, name: str) -> bool:
        return self._triton_repository is not None and model_dir.resolve() == self._triton_repository / name

    async def _wait_unloaded(self, name: str) -> None:
        """Until Triton has finished unloading `name`: it answers unload at once and unloads after."""
        deadline = time.monotonic() + UNLOAD_WAIT_S
        while time.monotonic() < deadline:
            try:
                index = await self.client.get_model_repository_index(client_timeout=CONTROL_TIMEOUT_S)
            except InferenceServerException:
                return  # the load itself reports an unreachable Triton
            if not any(m.name == name and m.state == "UNLOADING" for m in index.models):
                return
            await asyncio.sleep(UNLOAD_POLL_S)
        log.warning("model '%s' still UNLOADING on Triton at %s after %.0f s", name, self.url, UNLOAD_WAIT_S)

    async def unload(self, model: LoadedModel) -> None:
        if not isinstance(model, TritonModel):
            raise TypeError(f"{self.name} cannot unload a {type(model).__name__}")
        async with self._locks.setdefault(model.name, asyncio.Lock()):
            held = self._held.get(model.name, {})
            if held.get(model.version) is not model:
                return  # unloaded already, or a newer load of the version replaced it in Triton
            del held[model.version]
            try:
                if held:  # the other versions stay: Triton reloads the name holding only them
                    request = self._load_request(next(iter(held.values())).source, sorted(held, key=int))
                    await self.client.load_model(model.name, config=request.config, files=request.files or None,
                                                 client_timeout=CONTROL_TIMEOUT_S)
                    return
                del self._held[model.name]
                await self.client.unload_model(model.name, client_timeout=CONTROL_TIMEOUT_S)
            except (InferenceServerException, OSError, MeshError) as error:
                cause = self._control_message(error) if isinstance(error, InferenceServerException) else error
                raise Internal(f"failed to unload model '{model.name}' version {model.version} from Triton at "
                               f"{self.url}: {cause}") from None
            self._unloaded.add(model.name)

    def infer_error(self, name: str, error: grpc.aio.AioRpcError) -> MeshError:
        code, details = error.code(), error.details() or ""
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInput(details)
        # Not run, either way: the node forgets its copy and routes the request again, to a copy elsewhere.
        # A version Triton no longer holds is NOT_FOUND, or UNAVAILABLE "... is not at ready state".
        if code == grpc.StatusCode.NOT_FOUND or (code == grpc.StatusCode.UNAVAILABLE and NOT_READY in details):
            return ModelLost(f"model '{name}' is not loaded on Triton at {self.url} any more: {details}")
        if code == grpc.StatusCode.UNAVAILABLE:
            return ModelLost(f"model '{name}': Triton at {self.url} is unreachable: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"model '{name}' on Triton at {self.url} ran out of time: {details}")
        return Internal(f"inference failed for model '{name}' on Triton at {self.url}: {details}")

    def _control_message(self, error: InferenceServerException) -> str:
        if error.status() == str(grpc.StatusCode.UNAVAILABLE):
            return f"Triton at {self.url} is unreachable: {error.message()}"
        return _first_paragraph(error.message() or str(error))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._channel is not None:
            await self._channel.close()


def create(settings: RuntimeSettings) -> TritonRuntime:
    if not settings.triton_url:
        raise ValueError("the triton runtime needs triton_url")
    return TritonRuntime(settings.triton_url, settings.triton_model_repository)
