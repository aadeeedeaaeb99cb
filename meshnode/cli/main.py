"""The `meshserve` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from meshnode.cli.admin import add_admin_parsers, run_admin_command
from meshnode.runtimes import RUNTIMES
from meshnode.settings import NodeSettings, parse_size


def _node_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # No abbreviations: `--etcd-password X` must be refused, not read as --etcd-password-file X.
    node = sub.add_parser("node", help="run a mesh node (every flag also reads MESHSERVE_<FLAG>)", allow_abbrev=False)
    # Defaults are None so that an unset flag leaves the environment variable or default in force.
    node.add_argument("--etcd", help="etcd endpoints HOST:PORT[,HOST:PORT...], tried in turn (MESHSERVE_ETCD)")
    node.add_argument("--etcd-prefix", help="key prefix in etcd (default meshserve)")
    _security_flags(node)
    node.add_argument("--host", help="address to bind (default 127.0.0.1)")
    node.add_argument("--port", type=int, help="gRPC port (default 8033; 0 picks a free one)")
    node.add_argument("--model-repository",
                      help="Triton-layout model repository: a directory, or a store's prefix (s3://bucket/models)")
    _storage_flags(node)
    node.add_argument("--capacity", help="memory for loaded models: 512MiB, 2GiB, or bytes")
    node.add_argument("--instance-id", help="this node's id in the mesh (default HOST-PID)")
    node.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 2112; 0 picks one)")
    node.add_argument("--http-port", type=int, help="KServe v2 REST port (default: off; 0 picks a free one)")
    node.add_argument("--http-max-request-size",
                      help="largest REST request body: 64MiB (default), ...; larger ones get 413")
    node.add_argument("--load-timeout", dest="load_timeout_s", type=float, help="seconds a load may take")
    node.add_argument("--load-failure-backoff", dest="load_failure_backoff_s", type=float,
                      help="seconds before a failed model is tried again on this node")
    node.add_argument("--load-concurrency", type=int, help="loads running at once (default 2); others queue")
    node.add_argument("--churn-guard", dest="churn_guard_s", type=float,
                      help="seconds a model stays safe from eviction when another node could load instead (2)")
    node.add_argument("--advertise-host", help="address peers use to reach this node (default: --host)")
    node.add_argument("--hot-rate-per-copy", type=float,
                      help="requests/s a copy serves before the mesh adds another (default 33.3)")
    node.add_argument("--hot-inflight-per-copy", type=int, help="in-flight requests per copy before adding one (16)")
    node.add_argument("--max-copies", type=int, help="most copies of one model for load (default 8)")
    node.add_argument("--copy-check-interval", dest="copy_check_interval_s", type=float,
                      help="seconds between copy decisions (default 5)")
    node.add_argument("--alias-retire-after", dest="alias_retire_after_s", type=float,
                      help="seconds before an auto-delete alias's old model is unregistered (default 10)")
    node.add_argument("--no-proactive-loads", dest="proactive_loads", action="store_const", const=False,
                      help="do not load recently used or new models into free space ahead of requests")
    node.add_argument("--max-queued-per-model", type=int,
                      help="requests for one model that may wait here (its load, a free run slot) before more go "
                           "to other copies or get RESOURCE_EXHAUSTED (default 32)")
    node.add_argument("--max-inflight", type=int,
                      help="inference requests in flight on this node before more get RESOURCE_EXHAUSTED (512)")
    node.add_argument("--grpc-server", choices=("aio", "threaded"),
                      help="the gRPC ports' server: grpcio's threaded server (default), whose polling threads answer "
                           "local hits and forward to peers themselves, or grpc.aio (every call on the event loop)")
    node.add_argument("--grpc-threads", type=int,
                      help="with --grpc-server threaded: threads of the gRPC ports, made as calls need them; a local "
                           "hit or a forward in flight holds one (default: --max-inflight + 128)")
    node.add_argument("--runtime", choices=sorted(RUNTIMES), help="what runs the models (default onnxruntime)")
    node.add_argument("--triton-url", help="Triton's gRPC HOST:PORT, for --runtime triton (explicit model control)")
    node.add_argument("--triton-model-repository",
                      help="Triton's --model-repository: its models load by name, others are uploaded")
    node.add_argument("--otlp-endpoint", help="send traces to this OTLP/gRPC collector, e.g. http://HOST:4317 "
                                              "(also on with OTEL_EXPORTER_OTLP_ENDPOINT; OTEL_* variables apply)")
    node.add_argument("--log-format", choices=("text", "json"), help="log lines as text (default) or JSON")
    node.add_argument("--per-model-metrics", type=int,
                      help="label the metrics of the N busiest models with modelId (default 0: no model labels)")


def _storage_flags(node: argparse.ArgumentParser) -> None:
    node.add_argument("--repository-poll-interval", type=float,
                      help="seconds between listings of a store's repository for models added or removed (30)")
    node.add_argument("--model-store", help="where uploaded models are written (default: --model-repository)")
    node.add_argument("--allowed-storage",
                      help="comma-separated path or URI prefixes a registration's storage_uri must lie under")
    node.add_argument("--disk-cache", help="directory keeping models downloaded from stores (default: a temporary "
                                           "one, removed when the node stops)")
    node.add_argument("--disk-cache-size", help="most bytes the disk cache keeps: 20GiB, ... (default 10GiB)")
    node.add_argument("--s3-endpoint-url", help="S3-compatible store's endpoint (default: AWS, or AWS_ENDPOINT_URL)")
    node.add_argument("--s3-region", help="S3 region (default: AWS_REGION or the AWS config files)")
    node.add_argument("--s3-anonymous", action="store_const", const=True, help="read public buckets unsigned")


def _security_flags(node: argparse.ArgumentParser) -> None:
    node.add_argument("--etcd-ca", help="CA of etcd's server certificate: talk to etcd over TLS")
    node.add_argument("--etcd-cert", help="client certificate for etcd (with --etcd-key)")
    node.add_argument("--etcd-key", help="key of --etcd-cert")
    node.add_argument("--etcd-user", help="etcd user; its password from --etcd-password-file or "
                                          "MESHSERVE_ETCD_PASSWORD (never a flag)")
    node.add_argument("--etcd-password-file", help="file holding the etcd user's password")
    node.add_argument("--tls-cert", help="certificate of the client port (inference, management): TLS")
    node.add_argument("--tls-key", help="key of --tls-cert")
    node.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mTLS)")
    node.add_argument("--peer-cert", help="this node's certificate towards peers (mutual TLS between nodes)")
    node.add_argument("--peer-key", help="key of --peer-cert")
    node.add_argument("--peer-ca", help="the mesh CA: peers must present a certificate it signed")
    node.add_argument("--peer-port", type=int, help="port for peers under mutual TLS (default 0: a free one)")
    node.add_argument("--mesh-secret-file", help="without peer TLS: peers prove membership with an HMAC keyed "
                                                 "with this secret, so only they may send a hop")
    node.add_argument("--auth-tokens", help="file of `TOKEN ROLE` lines (roles reader, admin) for management")
    node.add_argument("--require-auth-for-infer", action="store_const", const=True,
                      help="inference also needs a token (any role)")


def _local_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    local = sub.add_parser("local", help="start an etcd and N nodes on loopback for development")
    local.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    local.add_argument("--model-repository", required=True, help="Triton-layout model repository directory")
    local.add_argument("--port", type=int, default=8033, help="first node's gRPC port; the others count up")
    local.add_argument("--capacity", default="1GiB", help="each node's capacity (default 1GiB)")
    local.add_argument("--triton", action="store_true",
                       help="run each node beside a Triton server of its own (`make triton` installs it)")
    local.add_argument("--tls", action="store_true",
                       help="generate a throwaway CA and certificates: mutual TLS between peers, TLS for clients")


def _simulate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    simulate = sub.add_parser("simulate", add_help=False,
                              help="run the placement and cache policies over a workload, against baselines")
    simulate.add_argument("args", nargs=argparse.REMAINDER, help="see `meshserve simulate --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshserve", description="A gRPC routing mesh for ML models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _node_parser(sub)
    add_admin_parsers(sub)
    _local_parser(sub)
    _simulate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulate"]:  # its own parser owns every argument after the word, --help included
        from placement.simulate_cli import main as simulate

        return simulate(argv[1:], parse_size=parse_size)
    args = build_parser().parse_args(argv)
    if args.command == "node":
        given = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
        try:
            settings = NodeSettings(**given)
        except ValidationError as error:
            print(f"meshserve node: invalid settings:\n{error}", file=sys.stderr)
            return 2
        from meshnode.cli.serve import main_node

        return main_node(settings)
    if args.command == "local":
        from pathlib import Path

        from meshnode.local.mesh import run_local

        return run_local(args.nodes, Path(args.model_repository), args.port, args.capacity, args.triton, args.tls)
    return run_admin_command(args)


if __name__ == "__main__":
    sys.exit(main())
