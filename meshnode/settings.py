"""Node settings: command-line flags over MESHSERVE_* environment variables over defaults."""

from __future__ import annotations

import re
from pathlib import Path, PurePath
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from meshnode.runtimes import RUNTIMES

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_EXPONENT = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4}
# gRPC worker threads beyond --max-inflight: open streams and calls that are not inference (status, management).
GRPC_THREADS_BESIDE = 128


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
# A local path or a store's URI (meshnode.storage): a Path given in code is taken as its text.
Location = Annotated[str, BeforeValidator(lambda value: str(value) if isinstance(value, PurePath) else value)]


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MESHSERVE_", extra="forbid")

    etcd: str = Field(description="etcd endpoints HOST:PORT[,HOST:PORT...]")
    etcd_prefix: str = "meshserve"
    # etcd over TLS (CA of etcd's server certificate; a client certificate with --client-cert-auth) and auth.
    etcd_ca: Path | None = None
    etcd_cert: Path | None = None
    etcd_key: Path | None = None
    etcd_user: str | None = None
    etcd_password_file: Path | None = None
    # Only from the environment (MESHSERVE_ETCD_PASSWORD): a flag's value shows in `ps`.
    etcd_password: SecretStr | None = None
    # TLS on the client port (inference and management); with tls_client_ca, clients need a certificate.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Mutual TLS between peers, on a port of its own (advertised as the node's endpoint in the mesh).
    peer_cert: Path | None = None
    peer_key: Path | None = None
    peer_ca: Path | None = None
    peer_port: int = 0
    # Without peer TLS, peers prove they are mesh members with an HMAC keyed with this file's secret.
    mesh_secret_file: Path | None = None
    auth_tokens: Path | None = None  # `TOKEN ROLE` per line: roles on management (api.access)
    require_auth_for_infer: bool = False
    host: str = "127.0.0.1"
    advertise_host: str | None = None  # address peers use to reach this node; default: host
    port: int = 8033
    # Where models are (meshnode.storage): a Triton-layout directory, or a store's prefix (s3://bucket/models)
    # whose listing the mesh follows, polled every repository_poll_interval seconds by one node.
    model_repository: Location
    repository_poll_interval: float = Field(default=30.0, gt=0)
    model_store: Location | None = None  # where uploads go (RepositoryModelLoad file: ...); default: the repository
    # Prefixes (paths or URIs, comma-separated) a registration's storage_uri must lie under; none: anywhere.
    allowed_storage: str | None = None
    # The disk tier between memory and a store: models downloaded once, kept, evicted by least recent use.
    # Without a directory, a temporary one that lives as long as the node.
    disk_cache: Path | None = None
    disk_cache_size: ByteSize = Field(default=10 * 2**30, gt=0)
    # S3-compatible stores; unset, botocore's standard AWS variables and files apply (AWS_ENDPOINT_URL, ...).
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_anonymous: bool = False
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
    # Overload (meshnode.serving): past these bounds a request is refused at once, never queued without end.
    # Requests for one model waiting on this node, for its copy's load or for a free run slot of the copy
    # (runs_per_copy below run at once). At the bound a request goes to another copy of the model, or gets
    # RESOURCE_EXHAUSTED at once when every copy is at its bound. Sized so that the last request waiting
    # still meets a typical deadline of about a second: it starts after about max_queued * run time /
    # runs_per_copy; for a 50 ms model (a mid-size CPU model; anything over inline_threshold_ms already runs
    # on the workers) on the default 2 workers each waiting request adds 25 ms, so 32 wait ~0.8 s and the
    # last keeps ~0.2 s to run and answer. A longer queue would only hold requests that miss their deadline
    # while holding memory and workers; a 5 ms model drains all 32 in 80 ms. It is twice
    # hot_inflight_per_copy, so the copy manager sees a copy hot and adds another before any is turned away.
    max_queued_per_model: int = Field(default=32, ge=1)
    # Inference requests in flight on this node, every model's and forwarded ones together: a backstop for
    # memory (each holds its tensors and a task), not the first line, which is the per-model bound above.
    # Generous: 512 holds the full queues of 15 models at once (32 waiting + 2 running each), many times
    # what the workers drain within a deadline, and caps what requests hold at 512 times their size (50 MB
    # for 100 kB tensors) however many clients send at once.
    max_inflight: int = Field(default=512, ge=1)
    # The gRPC ports' server: grpcio's threaded one, whose polling threads take ModelInfer and ModelStreamInfer
    # off gRPC's C core and answer a local hit or forward to a peer's copy themselves (cheaper than grpc.aio per
    # hit and per forward: see README), or grpc.aio's (every call a task on the event loop).
    grpc_server: Literal["aio", "threaded"] = "threaded"
    # Threads of the threaded server's gRPC ports: its workers (every call but inference's, while the event loop
    # works on it) and the most polling threads of its inference calls (one per local hit or forward in flight).
    # Made only as calls need them; None: max_inflight plus GRPC_THREADS_BESIDE, so that --max-inflight, not a
    # busy pool, bounds a node's requests (a forward to a dead peer holds one for seconds).
    grpc_threads: int | None = Field(default=None, ge=2)
    # A model marked by an alias with auto_delete is unregistered once no alias has pointed at it for
    # this long (requests already resolved to it finish; every node's watch sees the change first).
    alias_retire_after_s: float = Field(default=10.0, ge=0)
    # Observability (meshnode.observability): traces go to this OTLP/gRPC collector (OTEL_EXPORTER_OTLP_*
    # variables work too); logs as text or JSON lines; `modelId` labels for the N busiest models only.
    otlp_endpoint: str | None = None
    log_format: Literal["text", "json"] = "text"
    per_model_metrics: int = Field(default=0, ge=0)
    # KServe v2 REST (meshnode.api.http) on this port, beside gRPC; None: off. A request body over
    # http_max_request_size is refused with 413 before it is read: a client cannot make the node hold more.
    http_port: int | None = None
    http_max_request_size: ByteSize = Field(default=64 * 2**20, gt=0)

    @property
    def server_threads(self) -> int:
        """The gRPC ports' worker threads: --grpc-threads, else max_inflight plus GRPC_THREADS_BESIDE."""
        return self.grpc_threads or self.max_inflight + GRPC_THREADS_BESIDE

    @property
    def runs_per_copy(self) -> int:
        """Requests one copy of a model runs at once; the others for it wait (max_queued_per_model).

        ONNX Runtime runs a model inline on the event loop (one at a time, never overlapping another request)
        or on its `infer_workers` threads. Triton takes every request the node passes through and queues it in
        its own scheduler, out of the node's sight: the node counts the same `infer_workers` as running there
        and the rest as waiting, so a Triton copy is bounded the same way (34 at once by default, room for
        Triton's dynamic batcher to fill batches).
        """
        return max(1, self.infer_workers)

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, value: str) -> str:
        if value not in RUNTIMES:
            raise ValueError(f"unknown runtime {value!r}: choose one of {', '.join(RUNTIMES)}")
        return value

    def allowed_storage_prefixes(self) -> list[str]:
        return [p.strip() for p in (self.allowed_storage or "").split(",") if p.strip()]

    def etcd_endpoints(self) -> list[str]:
        return [e.strip() for e in self.etcd.split(",") if e.strip()]

    def etcd_password_value(self) -> str | None:
        if self.etcd_password_file is not None:
            return self.etcd_password_file.read_text().strip()
        return self.etcd_password.get_secret_value() if self.etcd_password is not None else None

    @model_validator(mode="after")
    def _security_complete(self) -> NodeSettings:
        pairs = (("--tls-cert", self.tls_cert, "--tls-key", self.tls_key),
                 ("--etcd-cert", self.etcd_cert, "--etcd-key", self.etcd_key))
        for flag, value, other_flag, other in pairs:
            if (value is None) != (other is None):
                raise ValueError(f"{flag} and {other_flag} go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (client certificates need TLS)")
        if len({p is None for p in (self.peer_cert, self.peer_key, self.peer_ca)}) > 1:
            raise ValueError("peer mutual TLS needs all of --peer-cert, --peer-key and --peer-ca")
        if self.auth_tokens is not None and self.peer_cert is None and self.mesh_secret_file is None:
            raise ValueError("--auth-tokens needs peers to prove they are mesh members (--peer-cert/--peer-key/"
                             "--peer-ca or --mesh-secret-file): they ask each other to load copies, an admin's call")
        if self.require_auth_for_infer and self.auth_tokens is None:
            raise ValueError("--require-auth-for-infer needs --auth-tokens FILE")
        if self.etcd_user is not None and self.etcd_password_file is None and self.etcd_password is None:
            raise ValueError("--etcd-user needs a password: --etcd-password-file FILE or MESHSERVE_ETCD_PASSWORD")
        if not self.etcd_endpoints():
            raise ValueError("--etcd needs at least one HOST:PORT")
        return self

    @model_validator(mode="after")
    def _triton_needs_url(self) -> NodeSettings:
        if self.runtime == "triton" and not self.triton_url:
            raise ValueError("runtime 'triton' needs the Triton server's gRPC address: --triton-url HOST:PORT "
                             "(MESHSERVE_TRITON_URL)")
        return self
