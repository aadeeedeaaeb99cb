"""Runtimes by name: the one place the node turns its `runtime` setting into a Runtime.

Each module named in RUNTIMES exposes `create(settings) -> Runtime` and is imported only when chosen, so
a node running Triton never imports onnxruntime's runtime and the other way round. Adding a runtime is
adding its module and its line here.

A leaf beside the layers: runtimes may import only errors, net (the channel to a sidecar) and storage
(where model files are); they read the node's settings through base.RuntimeSettings.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from meshnode.runtimes.base import Runtime, RuntimeSettings

RUNTIMES = {"onnxruntime": "onnx", "triton": "triton"}  # setting value -> module in meshnode.runtimes


def create_runtime(settings: RuntimeSettings) -> Runtime:
    module = importlib.import_module(f"meshnode.runtimes.{RUNTIMES[settings.runtime]}")
    return cast("Runtime", module.create(settings))
