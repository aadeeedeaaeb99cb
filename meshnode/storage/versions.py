"""Which versions of a model are served: Triton's `version_policy` from the model's config.pbtxt.

Triton serves, of the numeric version directories present, the newest N (`latest { num_versions: N }`, the
default with N = 1), every one (`all { }`) or the listed ones that exist (`specific { versions: [...] }`); a
request without a version gets the newest served one. Both runtimes follow this, so a model answers alike
through ONNX Runtime and through Triton. The config is parsed with protobuf's text format against Triton's own
ModelConfig message: any config Triton accepts parses here, and a broken one fails the load with the parser's
message. A model loaded with a config override (RepositoryModelLoad's `config`, ModelConfig in protobuf's JSON
form) has that instead of its config.pbtxt, as in Triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from meshnode.errors import LoadFailed

CONFIG_FILE = "config.pbtxt"


def read_config(model_dir: Path, override: str = "") -> model_config_pb2.ModelConfig:
    """The model's config: `override` when it has one, else its config.pbtxt, else an empty config;
    LoadFailed names a broken one."""
    config = model_config_pb2.ModelConfig()
    if override:
        try:
            return json_format.Parse(override, config)
        except json_format.ParseError as error:  # checked when loaded: only a record written by hand gets here
            raise LoadFailed(f"the model's config override is not a valid model config: {error}") from None
    path = model_dir / CONFIG_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return config
    except (OSError, UnicodeDecodeError) as error:
        raise LoadFailed(f"cannot read {path}: {error}") from None
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise LoadFailed(f"{path} is not a valid model config: {error}") from None
    return config


def served(policy: model_config_pb2.ModelVersionPolicy, present: Sequence[str]) -> list[str]:
    """Of the version directories `present` (numeric, ascending), those `policy` serves, ascending."""
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return list(present)
    if kind == "specific":
        wanted = {str(v) for v in policy.specific.versions}
        return [v for v in present if v in wanted]
    count = policy.latest.num_versions if kind == "latest" else 1
    return list(present[-count:]) if count > 0 else []


def only(config: model_config_pb2.ModelConfig, versions: Sequence[str]) -> model_config_pb2.ModelConfig:
    """A copy of `config` whose policy serves exactly `versions`: what a runtime is asked to hold."""
    narrowed = model_config_pb2.ModelConfig()
    narrowed.CopyFrom(config)
    narrowed.version_policy.specific.versions[:] = sorted(int(v) for v in versions)
    return narrowed
