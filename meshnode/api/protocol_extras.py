"""Thin gRPC handlers of the rest of Triton's inference protocol, on tritonclient's (Triton's) messages.

ModelConfig (api.config) and ModelStatistics (mesh.statistics) answer for any model through any node;
shared memory answers as a Triton without it does (no regions; registering is refused: tensors travel
between nodes, so they must be in the request); TraceSetting and LogSettings read, and LogSettings changes,
what the node has (log levels: the root logger's, which SIGUSR1/SIGUSR2 move too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from tritonclient.grpc import service_pb2 as triton_pb

from meshnode.api.access import from_member
from meshnode.api.config import ModelConfigs
from meshnode.api.status import maps_errors
from meshnode.errors import InvalidInput, Unsupported
from meshnode.mesh.statistics import MeshStatistics, node_scope
from router.hop import Hop

# Triton's log settings as the root logger's level: each of log_info/warning/error is on when the level lets
# that severity through; log_verbose_level > 0 is DEBUG.
_LOG_SWITCHES = (("log_info", logging.INFO), ("log_warning", logging.WARNING), ("log_error", logging.ERROR))
_FIXED_LOG_SETTINGS = ("log_file", "log_format")  # chosen at start (stderr; --log-format)
SHM_REFUSED = ("meshserve does not support {kind} shared memory: a request may run on another node, so send "
               "its tensors in the request (raw_input_contents or contents)")


def log_settings(level: int, log_format: str) -> dict[str, Any]:
    """Triton's LogSettings for a root logger at `level`."""
    settings = {key: triton_pb.LogSettingsResponse.SettingValue(bool_param=level <= threshold)
                for key, threshold in _LOG_SWITCHES}
    settings["log_verbose_level"] = triton_pb.LogSettingsResponse.SettingValue(uint32_param=int(level <= logging.DEBUG))
    settings["log_file"] = triton_pb.LogSettingsResponse.SettingValue(string_param="")
    settings["log_format"] = triton_pb.LogSettingsResponse.SettingValue(string_param=log_format)
    return settings


def level_after(level: int, changes: Mapping[str, Any]) -> int:
    """The root logger's level once `changes` (Triton's LogSettings request values) apply to `level`."""
    unsupported = sorted(set(changes) & set(_FIXED_LOG_SETTINGS))
    unknown = sorted(set(changes) - {k for k, _ in _LOG_SWITCHES} - {"log_verbose_level", *_FIXED_LOG_SETTINGS})
    if unknown:
        raise InvalidInput(f"unknown log settings {', '.join(unknown)}: expected log_info, log_warning, log_error, "
                           "log_verbose_level, log_file or log_format")
    if unsupported:
        raise Unsupported(f"log settings {', '.join(unsupported)} cannot change while the node runs (stderr, "
                          "--log-format); log_info, log_warning, log_error and log_verbose_level can")
    on = {key: level <= threshold for key, threshold in _LOG_SWITCHES}
    verbose = level <= logging.DEBUG
    for key, value in changes.items():
        expected = "uint32_param" if key == "log_verbose_level" else "bool_param"
        if value.WhichOneof("parameter_choice") != expected:
            raise InvalidInput(f"log setting {key} takes a {expected}")
        if key == "log_verbose_level":
            verbose = value.uint32_param > 0
        else:
            on[key] = value.bool_param
    if verbose:
        return logging.DEBUG
    return next((threshold for key, threshold in _LOG_SWITCHES if on[key]), logging.CRITICAL)


class ProtocolExtrasServicer:
    def __init__(self, *, configs: ModelConfigs, statistics: MeshStatistics, tracing: bool, log_format: str,
                 root_logger: logging.Logger | None = None) -> None:
        self._configs = configs
        self._statistics = statistics
        self._tracing = tracing
        self._log_format = log_format
        self._root = root_logger or logging.getLogger()

    def handlers(self) -> dict[str, Callable[..., Any]]:
        own = {name: getattr(self, name) for name in ("ModelConfig", "ModelStatistics", "TraceSetting", "LogSettings")}
        return own | _NoSharedMemory("System", "system").handlers() | _NoSharedMemory("Cuda", "CUDA").handlers()

    @maps_errors
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        # Only a member's hop marks a call as forwarded (then it is answered here, never asked on).
        forwarded = from_member() and Hop.from_metadata(context.invocation_metadata()).hops > 0
        return triton_pb.ModelConfigResponse(
            config=await self._configs.config(request.name, request.version, forwarded))

    @maps_errors
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        stats = await self._statistics.report(request.name, request.version,
                                              node_scope(context.invocation_metadata()))
        return triton_pb.ModelStatisticsResponse(model_stats=stats)

    @maps_errors
    async def TraceSetting(self, request: Any, context: Any) -> Any:
        if request.settings:
            raise Unsupported(f"trace settings {', '.join(sorted(request.settings))} cannot change while the node "
                              "runs: tracing is OpenTelemetry's, set at start (--otlp-endpoint, OTEL_TRACES_SAMPLER "
                              "and OTEL_TRACES_SAMPLER_ARG for the rate)")
        value = triton_pb.TraceSettingResponse.SettingValue
        return triton_pb.TraceSettingResponse(settings={
            "trace_mode": value(value=["opentelemetry"]),
            "trace_level": value(value=["TIMESTAMPS" if self._tracing else "OFF"]),
        })

    @maps_errors
    async def LogSettings(self, request: Any, context: Any) -> Any:
        if request.settings:
            self._root.setLevel(level_after(self._root.getEffectiveLevel(), request.settings))
        return triton_pb.LogSettingsResponse(settings=log_settings(self._root.getEffectiveLevel(), self._log_format))


class _NoSharedMemory:
    """{System,Cuda}SharedMemory{Status,Register,Unregister} as a server that holds no region."""

    def __init__(self, kind: str, label: str) -> None:
        self._kind = kind  # the methods' and messages' prefix
        self._label = label  # in messages

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {f"{self._kind}SharedMemory{action}": getattr(self, action)
                for action in ("Status", "Register", "Unregister")}

    def _response(self, action: str) -> Any:
        return getattr(triton_pb, f"{self._kind}SharedMemory{action}Response")()

    @maps_errors
    async def Status(self, request: Any, context: Any) -> Any:
        if request.name:  # Triton's answer for a region it does not hold
            raise InvalidInput(f"Unable to find {self._label} shared memory region: '{request.name}'")
        return self._response("Status")

    @maps_errors
    async def Register(self, request: Any, context: Any) -> Any:
        raise Unsupported(SHM_REFUSED.format(kind=self._label))

    @maps_errors
    async def Unregister(self, request: Any, context: Any) -> Any:
        return self._response("Unregister")  # none registered: nothing to do, as Triton
