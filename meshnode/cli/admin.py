"""`meshserve models | aliases | nodes`: clients of the management service, for people and scripts.

Tables for people; `--json` prints the service's messages as JSON (field names as in
proto/meshpb/management.proto) for scripts. Errors go to stderr with the gRPC status, exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from meshnode.net import params as wire
from meshnode.net import transport
from meshnode.net.tls import ClientTls
from meshnode.settings import parse_size
from meshpb import mpb, pb

DEFAULT_TARGET = "127.0.0.1:8033"
TIMEOUT_S = 120.0

# What a command answers: one message, a listing, or nothing (unregister, delete).
Result: TypeAlias = (
    "mpb.ModelStatus | mpb.Alias | list[mpb.ModelStatus] | list[mpb.Alias] | list[mpb.Node] | None")


def add_admin_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def command(parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                text: str) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=text)
        p.add_argument("--target", default=DEFAULT_TARGET, help=f"any node, HOST:PORT (default {DEFAULT_TARGET})")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        p.add_argument("--token-file", help="file holding a bearer token (default: MESHSERVE_TOKEN)")
        p.add_argument("--ca", help="CA of the node's certificate: connect over TLS")
        p.add_argument("--cert", help="client certificate, when the node requires one (with --key)")
        p.add_argument("--key", help="key of --cert")
        return p

    models = sub.add_parser("models", help="list, register, unregister, inspect models").add_subparsers(
        dest="action", required=True)
    command(models, "list", "every registered model and its state").add_argument(
        "--prefix", default="", help="only names starting with this")
    register = command(models, "register", "register a model (and load it unless --lazy)")
    register.add_argument("name")
    register.add_argument("storage_uri", help="where the model is: a path or URI the nodes can read (s3://, "
                                              "http(s)://, file://), or with --upload a local directory or file")
    register.add_argument("--upload", action="store_true",
                          help="send the local model's files; the mesh writes them to its model store")
    register.add_argument("--lazy", action="store_true", help="register only; load on first request")
    register.add_argument("--size-hint", help="expected size in memory (512MiB, bytes)")
    register.add_argument("--pinned", action="store_true", help="never evict it once loaded")
    register.add_argument("--min-copies", type=int, default=0, help="keep at least this many copies loaded")
    register.add_argument("--load-timeout", type=float, default=0.0, help="seconds its load may take")
    register.add_argument("--timeout-ms", type=_milliseconds, default=0,
                          help="milliseconds one inference may take; longer ones end with DEADLINE_EXCEEDED")
    register.add_argument("--runtime", help="only nodes running this load it: onnxruntime, triton, or any "
                                            "(default: the runtime of the node you ask)")
    command(models, "unregister", "unload a model everywhere and forget it").add_argument("name")
    command(models, "status", "one model: state, copies, failures, size, last use").add_argument("name")

    aliases = sub.add_parser("aliases", help="names that point at a model (vmodels)").add_subparsers(
        dest="action", required=True)
    set_alias = command(aliases, "set", "point ALIAS at MODEL: loads MODEL first, then switches")
    set_alias.add_argument("alias")
    set_alias.add_argument("model")
    set_alias.add_argument("--auto-delete", action="store_true",
                           help="unregister the old model once no alias points at it")
    set_alias.add_argument("--timeout", type=float, default=300.0, help="seconds the switch may take (300)")
    command(aliases, "get", "where an alias points").add_argument("alias")
    command(aliases, "delete", "remove an alias").add_argument("alias")
    command(aliases, "list", "every alias").add_argument("--prefix", default="", help="only names starting with this")

    command(sub, "nodes", "the mesh's nodes: capacity, use, cache age, load")


def _milliseconds(text: str) -> int:
    """--timeout-ms: a positive whole number (the service checks the upper bound)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of milliseconds: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 ms: {text}")
    return value


async def _pages(call: Callable[..., Any], request: Any, field: str) -> AsyncIterator[Any]:
    while True:
        response = await call(request, timeout=TIMEOUT_S)
        for item in getattr(response, field):
            yield item
        if not response.next_page_token:
            return
        request.page_token = response.next_page_token


def open_channel(args: argparse.Namespace) -> grpc.aio.Channel:
    """The channel to --target: TLS with --ca (--cert/--key: a client certificate), a bearer token if given."""
    token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get("MESHSERVE_TOKEN")
    entries = (("authorization", f"Bearer {token}"),) if token else ()
    tls = None
    if args.ca or args.cert:
        tls = ClientTls(*(Path(p) if p else None for p in (args.ca, args.cert, args.key)))
    return transport.create_channel(args.target, tls, (lambda: entries) if entries else None)


def upload_request(args: argparse.Namespace) -> pb.RepositoryModelLoadRequest:
    """`models register --upload`: the local model's files as RepositoryModelLoad's `file:` parameters (a single
    file becomes version 1 of a Triton layout), with the registration's settings in its `config`."""
    source = Path(args.storage_uri.removeprefix("file://")).expanduser()
    if source.is_file():
        files = {f"1/{source.name}": source.read_bytes()}
    elif source.is_dir():
        files = {p.relative_to(source).as_posix(): p.read_bytes() for p in sorted(source.rglob("*"))
                 if p.is_file() and "__pycache__" not in p.parts}
    else:
        raise SystemExit(f"meshserve: --upload: no local file or directory {source}")
    config = {key: value for key, value in (("min_copies", args.min_copies), ("load_timeout_s", args.load_timeout),
                                            ("timeout_ms", args.timeout_ms), ("runtime", args.runtime),
                                            ("pinned", args.pinned)) if value}
    parameters = {f"file:{name}": pb.ModelRepositoryParameter(bytes_param=content) for name, content in files.items()}
    parameters["config"] = pb.ModelRepositoryParameter(string_param=json.dumps(config))
    parameters[wire.LAZY] = pb.ModelRepositoryParameter(bool_param=args.lazy)
    if args.size_hint:
        parameters[wire.SIZE_HINT] = pb.ModelRepositoryParameter(string_param=str(parse_size(args.size_hint)))
    return pb.RepositoryModelLoadRequest(model_name=args.name, parameters=parameters)


async def _call(args: argparse.Namespace) -> Result:
    async with open_channel(args) as channel:
        stub = transport.ManagementStub(channel)
        kind, action = args.command, getattr(args, "action", "")
        if kind == "nodes":
            return list((await stub.ListNodes(mpb.ListNodesRequest(), timeout=TIMEOUT_S)).nodes)
        if kind == "models":
            if action == "list":
                return [m async for m in _pages(stub.ListModels, mpb.ListModelsRequest(prefix=args.prefix), "models")]
            if action == "register" and args.upload:
                await transport.InferenceStub(channel).RepositoryModelLoad(upload_request(args), timeout=TIMEOUT_S)
                return await stub.GetModelStatus(mpb.GetModelStatusRequest(name=args.name), timeout=TIMEOUT_S)
            if action == "register":
                return await stub.RegisterModel(mpb.RegisterModelRequest(
                    name=args.name, storage_uri=args.storage_uri, lazy=args.lazy, pinned=args.pinned,
                    size_hint_bytes=parse_size(args.size_hint) if args.size_hint else 0,
                    min_copies=args.min_copies, load_timeout_s=args.load_timeout, timeout_ms=args.timeout_ms,
                    runtime=args.runtime),
                    timeout=TIMEOUT_S)
            if action == "unregister":
                await stub.UnregisterModel(mpb.UnregisterModelRequest(name=args.name), timeout=TIMEOUT_S)
                return None
            return await stub.GetModelStatus(mpb.GetModelStatusRequest(name=args.name), timeout=TIMEOUT_S)
        if action == "list":
            return [a async for a in _pages(stub.ListAliases, mpb.ListAliasesRequest(prefix=args.prefix), "aliases")]
        if action == "set":
            return await stub.SetAlias(mpb.SetAliasRequest(
                alias=args.alias, model=args.model, auto_delete=args.auto_delete), timeout=args.timeout)
        if action == "delete":
            await stub.DeleteAlias(mpb.DeleteAliasRequest(alias=args.alias), timeout=TIMEOUT_S)
            return None
        return await stub.GetAlias(mpb.GetAliasRequest(alias=args.alias), timeout=TIMEOUT_S)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _ago(at: float, now: float) -> str:
    return "never" if not at else _seconds(now - at) + " ago"


def _seconds(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def table(rows: Sequence[dict[str, Any]], empty: str) -> str:
    if not rows:
        return empty
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _model_row(m: Any, now: float) -> dict[str, Any]:
    loaded = sum(1 for c in m.copies if c.state == "loaded")
    return {"name": m.name, "state": m.state, "copies": f"{loaded}/{len(m.copies)}",
            "size": _size(m.size_bytes) if m.size_bytes else "-", "last_used": _ago(m.last_used, now),
            "aliases": ",".join(m.aliases) or "-"}


def _alias_row(a: Any, now: float) -> dict[str, Any]:
    note = f"switching to {a.switching_to}" if a.switching_to else (f"last switch failed: {a.last_error}"
                                                                      if a.last_error else "")
    return {"alias": a.alias, "model": a.model, "auto_delete": "yes" if a.auto_delete else "no",
            "updated": _ago(a.updated_at, now), "note": note or "-"}


def _node_row(n: Any, now: float) -> dict[str, Any]:
    return {"instance": n.instance_id, "endpoint": n.endpoint,
            "used": f"{_size(n.used_bytes)} / {_size(n.capacity_bytes)}",
            "models": n.model_count, "cache_age": _seconds(n.cache_age_s) if n.model_count else "-",
            "req/s": f"{n.request_rate:g}", "inflight": n.inflight, "loading": n.loads_in_progress,
            "state": "draining" if n.shutting_down else "serving", "runtime": n.runtime, "version": n.version}


def _model_detail(m: Any, now: float) -> str:
    size = _size(m.size_bytes) if m.size_bytes else "not measured yet"
    timeout = f"{m.timeout_ms} ms" if m.timeout_ms else "none (only the client's deadline)"
    lines = [f"{m.name}: {m.state}" + (f" ({m.reason})" if m.reason else ""),
             f"  storage: {m.storage_uri} (runs on {m.runtime or 'any'} nodes)",
             f"  size: {size}, last used {_ago(m.last_used, now)}",
             f"  pinned: {'yes' if m.pinned else 'no'}, min copies: {m.min_copies or 1}, "
             f"aliases: {', '.join(m.aliases) or '-'}",
             f"  inference timeout: {timeout}"]
    copies = [{"instance": c.instance_id, "state": c.state, "since": _ago(c.since, now)} for c in m.copies]
    lines.append(table(copies, "  no copies"))
    if m.failures:
        lines.append(table([{"instance": f.instance_id, "failed": _ago(f.at, now), "message": f.message}
                            for f in m.failures], ""))
    return "\n".join(lines)


def render(args: argparse.Namespace, result: Result) -> str:
    if args.json:
        def as_dict(m: Message) -> dict[str, Any]:
            return MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

        return json.dumps([as_dict(r) for r in result] if isinstance(result, list) else
                          as_dict(result) if result is not None else {"ok": True}, indent=2)
    now, action = time.time(), getattr(args, "action", "")
    if args.command == "nodes":
        # `nodes` answers a list of nodes
        return table([_node_row(n, now) for n in cast("list[mpb.Node]", result or [])], "(no nodes)")
    if result is None:
        return f"{action}: done"
    if isinstance(result, list):
        row = _model_row if args.command == "models" else _alias_row
        return table([row(r, now) for r in result], f"(no {args.command})")
    if isinstance(result, mpb.ModelStatus):
        return _model_detail(result, now)
    if action == "set":
        was = f" (was {result.previous_model})" if result.previous_model else ""
        return f"{result.alias} -> {result.model}{was}"
    return table([_alias_row(result, now)], "")


def run_admin_command(args: argparse.Namespace) -> int:
    what = " ".join(filter(None, ("meshserve", args.command, getattr(args, "action", ""))))
    try:
        result = asyncio.run(_call(args))
    except grpc.aio.AioRpcError as error:
        print(f"{what}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(render(args, result))
    return 0
