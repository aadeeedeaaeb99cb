"""`meshserve models ...`: a client of the node's repository API."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import grpc

from meshnode import transport
from meshnode.model_control import PARAM_LAZY, PARAM_SIZE_HINT, PARAM_UNREGISTER
from meshnode.settings import parse_size
from meshpb import pb


def _param(value: bool | str | int) -> pb.ModelRepositoryParameter:
    if isinstance(value, bool):
        return pb.ModelRepositoryParameter(bool_param=value)
    if isinstance(value, int):
        return pb.ModelRepositoryParameter(int64_param=value)
    return pb.ModelRepositoryParameter(string_param=value)


async def _run(args: argparse.Namespace) -> Any:
    async with transport.create_channel(args.target) as channel:
        stub = transport.InferenceStub(channel)
        timeout = 120.0
        if args.action == "register":
            config: dict[str, Any] = {"storage_uri": args.storage_uri}
            if args.pinned:
                config["pinned"] = True
            if args.min_copies:
                config["min_copies"] = args.min_copies
            if args.load_timeout:
                config["load_timeout_s"] = args.load_timeout
            params = {"config": _param(json.dumps(config))}
            if args.lazy:
                params[PARAM_LAZY] = _param(True)
            if args.size_hint:
                params[PARAM_SIZE_HINT] = _param(parse_size(args.size_hint))
            await stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name=args.name, parameters=params), timeout=timeout)
            return {"registered": args.name, "loaded": not args.lazy}
        if args.action == "unregister":
            await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(
                model_name=args.name, parameters={PARAM_UNREGISTER: _param(True)}), timeout=timeout)
            return {"unregistered": args.name}
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=timeout)
        rows = [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in index.models]
        if args.action == "list":
            return rows
        rows = [r for r in rows if r["name"] == args.name]
        if not rows:
            raise LookupError(f"model '{args.name}' is not registered")
        ready = await stub.ModelReady(pb.ModelReadyRequest(name=args.name), timeout=timeout)
        return {"name": args.name, "ready": ready.ready, "copies": rows}


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no models)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def run_models_command(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(_run(args))
    except grpc.aio.AioRpcError as error:
        print(f"meshserve models {args.action}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except LookupError as error:
        print(f"meshserve models {args.action}: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    elif isinstance(result, list):
        print(_table(result))
    elif "copies" in result:
        print(f"{result['name']}: {'ready' if result['ready'] else 'not ready'}")
        print(_table(result["copies"]))
    else:
        print(", ".join(f"{k}: {v}" for k, v in result.items()))
    return 0
