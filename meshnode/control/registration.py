"""Typed commands for model control, and their reading from Triton's repository parameters.

RepositoryModelLoad carries a `config` JSON string and `file:` uploads (Triton's wire format) plus
meshserve's own parameters (meshnode.net.params); every transport reads them here, once, into a
Registration or a CopyHere. The management service builds a Registration directly.

The `config` JSON holds meshserve's keys (MESHSERVE_KEYS) and, as in Triton, ModelConfig's fields in protobuf's
JSON form: those make the model's config override, which replaces its config.pbtxt (storage.versions.read_config)
until a load without them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2

from meshnode.errors import InvalidInput
from meshnode.net import params as wire
from meshnode.runtimes import RUNTIMES

# The largest inference timeout: what the management service's uint32 carries (49 days).
MAX_TIMEOUT_MS = 2**32 - 1
# The largest size hint: what an int64 holds (8 EiB), far beyond any node.
MAX_SIZE_HINT = 2**63 - 1
# The config JSON's keys that are meshserve's, not ModelConfig's ("runtime" is both: meshserve's wins).
MESHSERVE_KEYS = ("storage_uri", "runtime", "min_copies", "pinned", "load_timeout_s", "timeout_ms", "size_hint")
CLIP = 300  # characters of a client's text quoted in a message
# ModelConfig's fields, by either name protobuf's JSON form accepts.
_MODEL_CONFIG_KEYS = frozenset(name for f in model_config_pb2.ModelConfig.DESCRIPTOR.fields
                               for name in (f.name, f.json_name))
# What each keeping field must be, as InvalidInput says it, whether the value has the wrong type or range.
_RULES = {
    "runtime": f"config 'runtime' must be one of {', '.join(RUNTIMES)}, or \"\" for any",
    "min_copies": "config 'min_copies' must be a whole number from 1 to 100",
    "load_timeout_s": "config 'load_timeout_s' must be a positive number of seconds",
    "size_hint": f"size_hint must be a whole number of bytes in ASCII digits, from 0 to {MAX_SIZE_HINT}",
    "timeout_ms": f"config 'timeout_ms' must be a whole number of milliseconds from 1 to {MAX_TIMEOUT_MS}",
}


@dataclass(frozen=True, slots=True)
class Registration:
    """Register a model (or change its registration) and, unless lazy, load it here.

    A field left None keeps what the model's registration says (a default for a new model)."""

    name: str
    storage_uri: str | None = None  # None: the upload, else the current registration, else the repository's
    files: Mapping[str, bytes] = field(default_factory=dict)  # uploads: '1/model.onnx' -> bytes
    lazy: bool = False
    size_hint_bytes: int | None = None  # replaced on every registration: None clears it
    pinned: bool | None = None
    min_copies: int | None = None
    load_timeout_s: float | None = None
    timeout_ms: int | None = None  # an inference running longer ends with DEADLINE_EXCEEDED
    runtime: str | None = None  # "" for any; None: the registering node's for a new model
    # ModelConfig as JSON, replacing the model's config.pbtxt; "" for none (the file's). None keeps the record's.
    config_override: str | None = None

    def __post_init__(self) -> None:
        # Every way in (RepositoryModelLoad's config JSON, the management service) is held to the same rules.
        if self.runtime not in (None, "") and self.runtime not in RUNTIMES:
            raise InvalidInput(_RULES["runtime"])
        if self.min_copies is not None and not 1 <= self.min_copies <= 100:
            raise InvalidInput(_RULES["min_copies"])
        if self.load_timeout_s is not None and self.load_timeout_s <= 0:
            raise InvalidInput(_RULES["load_timeout_s"])
        if self.timeout_ms is not None and not 1 <= self.timeout_ms <= MAX_TIMEOUT_MS:
            raise InvalidInput(_RULES["timeout_ms"])

    def keeping(self) -> dict[str, Any]:
        """The record fields this registration sets about how and where the mesh keeps the model."""
        fields = {"pinned": self.pinned, "min_copies": self.min_copies, "load_timeout_s": self.load_timeout_s,
                  "timeout_ms": self.timeout_ms, "runtime": self.runtime, "config_override": self.config_override}
        return {k: v for k, v in fields.items() if v is not None}


@dataclass(frozen=True, slots=True)
class CopyHere:
    """From a peer: load a copy of a registered model on this node; its registration is unchanged."""

    name: str


def read_load(name: str, parameters: Mapping[str, object]) -> Registration | CopyHere:
    """RepositoryModelLoad's parameters as a command; InvalidInput names what is wrong."""
    if parameters.get(wire.COPY) is True:
        return CopyHere(name)
    files = {k[len("file:"):]: v for k, v in parameters.items() if k.startswith("file:")}
    if not all(isinstance(v, bytes) for v in files.values()):
        raise InvalidInput("file: parameters must carry bytes")
    config = _config(name, parameters.get("config"))
    size_hint = parameters.get(wire.SIZE_HINT, config.get("size_hint"))
    storage_uri = config.get("storage_uri")
    return Registration(
        name=name, storage_uri=storage_uri if isinstance(storage_uri, str) else None,
        files={k: v for k, v in files.items() if isinstance(v, bytes)},
        lazy=parameters.get(wire.LAZY) is True,
        size_hint_bytes=_size_hint(size_hint),
        config_override=_override(name, config),
        **_keeping(config),
    )


def _size_hint(value: object) -> int | None:
    """A size hint in bytes: a whole number or a string of its decimal digits. A value that is no whole number
    ("12MB", -5, 1.5, true) is no hint (None); digits that are not ASCII (a superscript two) or a number beyond
    MAX_SIZE_HINT are InvalidInput."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    if isinstance(value, str):
        if not value.isdigit():
            return None
        if not (value.isascii() and len(value) <= len(str(MAX_SIZE_HINT))):
            raise InvalidInput(_RULES["size_hint"])
        value = int(value)
    if value < 0:
        return None
    if value > MAX_SIZE_HINT:
        raise InvalidInput(_RULES["size_hint"])
    return value


def read_unregister(parameters: Mapping[str, object]) -> bool:
    """Whether RepositoryModelUnload's parameters ask to forget the model, not just unload it."""
    return parameters.get(wire.UNREGISTER) is True


def _keeping(config: Mapping[str, object]) -> dict[str, Any]:
    keeping: dict[str, Any] = {}
    runtime = config.get("runtime")
    if runtime is not None:
        if not isinstance(runtime, str):
            raise InvalidInput(_RULES["runtime"])
        keeping["runtime"] = runtime
    pinned, min_copies, timeout = config.get("pinned"), config.get("min_copies"), config.get("load_timeout_s")
    if pinned is not None:
        if not isinstance(pinned, bool):
            raise InvalidInput("config 'pinned' must be true or false")
        keeping["pinned"] = pinned
    if min_copies is not None:
        if not isinstance(min_copies, int) or isinstance(min_copies, bool):
            raise InvalidInput(_RULES["min_copies"])
        keeping["min_copies"] = min_copies
    if timeout is not None:
        if not isinstance(timeout, int | float) or isinstance(timeout, bool):
            raise InvalidInput(_RULES["load_timeout_s"])
        keeping["load_timeout_s"] = float(timeout)
    timeout_ms = config.get("timeout_ms")
    if timeout_ms is not None:
        if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool):
            raise InvalidInput(_RULES["timeout_ms"])
        keeping["timeout_ms"] = timeout_ms
    return keeping


def _config(name: str, raw: object) -> dict[str, object]:
    if raw is None:
        return {}
    # Triton's words start the refusal (its clients look for "failed to load"); the rest says what is wrong.
    refused = f"failed to load '{name}': the 'config' parameter"
    if not isinstance(raw, str):
        raise InvalidInput(f"{refused} must be a JSON string")
    try:
        config = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as error:
        raise InvalidInput(f"{refused} is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidInput(f"{refused} is not valid JSON: nested too deeply") from None
    except ValueError as error:  # an integer of more digits than int() converts (sys.get_int_max_str_digits)
        raise InvalidInput(f"{refused} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise InvalidInput(f"{refused} must be a JSON object")
    return config


def _override(name: str, config: Mapping[str, object]) -> str:
    """The config's ModelConfig fields as compact JSON ("" when it has none); InvalidInput names a key that is
    neither ModelConfig's nor meshserve's, or says why ModelConfig refuses a value."""
    fields = {k: v for k, v in config.items() if k not in MESHSERVE_KEYS}
    if not fields:
        return ""
    unknown = sorted(k for k in fields if k not in _MODEL_CONFIG_KEYS)
    if unknown:
        raise InvalidInput(f"failed to load '{name}': the 'config' parameter has unknown field '{_clip(unknown[0])}': "
                           f"neither a ModelConfig field nor one of {', '.join(MESHSERVE_KEYS)}")
    try:
        json_format.ParseDict(fields, model_config_pb2.ModelConfig())
    except json_format.ParseError as error:
        reason = str(error).splitlines()[0]  # the rest lists every field the message has
        raise InvalidInput(f"failed to load '{name}': the 'config' parameter is not a valid model config: "
                           f"{_clip(reason)}") from None
    return json.dumps(fields, separators=(",", ":"))


def _clip(text: str) -> str:
    """A client's text in a message (a key, protobuf's reason quoting a value): at most CLIP characters."""
    return text if len(text) <= CLIP else f"{text[:CLIP]}..."
