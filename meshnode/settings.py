"""Node settings: command-line flags over MESHSERVE_* environment variables over defaults."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from meshnode.runtimes import RUNTIMES

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_EXPONENT = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str | int) -> int:
    """'512MiB', '2GiB', '1.5G', '1048576' -> bytes. Binary units (KiB) are powers of 1024."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 512MiB, 2GiB, 1000000)")
    number, unit = match.groups()
    unit = (unit or "").lower()
    base = 1024 if "i" in unit else 1000  # KiB/MiB/GiB are binary, kB/MB/GB decimal
    return int(float(number) * base ** _EXPONENT[unit[:1]])


ByteSize = Annotated[int, BeforeValidator(parse_size)]


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MESHSERVE_", extra="forbid")

    etcd: str = Field(description="etcd endpoint HOST:PORT")
    etcd_prefix: str = "meshserve"
    host: str = "127.0.0.1"
    advertise_host: str | None = None  # address peers use to reach this node; default: host
    port: int = 8033
    model_repository: Path
    capacity: ByteSize = Field(gt=0)
    instance_id: str | None = None
    metrics_port: int | None = 2112
    runtime: str = "onnxruntime"  # a name in meshnode.runtimes.RUNTIMES
    triton_url: str | None = None  # HOST:PORT of Triton's gRPC endpoint; required with runtime "triton"
    # Triton's own --model-repository: models stored there load by name, others are uploaded to Triton.
    triton_model_repository: Path | None = None
    # A failed model is not loaded again on this node before this many seconds, unless a
    # RepositoryModelLoad asks for it explicitly: a broken file must not cause a load storm.
    load_failure_backoff_s: float = 30.0
    load_timeout_s: float = 120.0
    load_concurrency: int = Field(default=2, ge=1)  # loads running at once; the rest queue by priority
    # A full node refuses to evict models used within this many seconds while another node could
    # take the load instead, so a burst of cold models cannot flush its hot set. Short on purpose:
    # reuse protection does most of that work, and `meshserve simulate` showed long guards turning
    # loads away in bursts and slowing turnover when popularity shifts.
    churn_guard_s: float = 2.0
    # Copies (placement.copies): a copy busier than these thresholds gets company on another node.
    copy_check_interval_s: float = Field(default=5.0, gt=0)
    hot_rate_per_copy: float = Field(default=2000 / 60, gt=0)  # requests per second (ModelMesh: 2000/min)
    hot_inflight_per_copy: int = Field(default=16, ge=1)
    max_copies: int = Field(default=8, ge=1)
    proactive_loads: bool = True  # load recently used or new models into free space
    infer_workers: int = 2
    inline_threshold_ms: float = 0.5
    intra_op_threads: int = 1
    # A model marked by an alias with auto_delete is unregistered once no alias has pointed at it for
    # this long (requests already resolved to it finish; every node's watch sees the change first).
    alias_retire_after_s: float = Field(default=10.0, ge=0)

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, value: str) -> str:
        if value not in RUNTIMES:
            raise ValueError(f"unknown runtime {value!r}: choose one of {', '.join(RUNTIMES)}")
        return value

    @model_validator(mode="after")
    def _triton_needs_url(self) -> NodeSettings:
        if self.runtime == "triton" and not self.triton_url:
            raise ValueError("runtime 'triton' needs the Triton server's gRPC address: --triton-url HOST:PORT "
                             "(MESHSERVE_TRITON_URL)")
        return self
