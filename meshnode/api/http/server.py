"""KServe v2 REST on aiohttp, in the node's event loop: each endpoint converts its JSON to the gRPC method's
request, calls that method's guarded handler (the one the gRPC server serves), and writes the answer.

Errors answer `{"error": "..."}` with the HTTP status Triton's HTTP endpoint gives each code (NOT_FOUND 404,
UNAVAILABLE 503, UNIMPLEMENTED 501, INTERNAL 500, the rest 400), plus the statuses HTTP has for what Triton
lacks: RESOURCE_EXHAUSTED 429 (overload: retry later), DEADLINE_EXCEEDED 504, UNAUTHENTICATED 401,
PERMISSION_DENIED 403. A body over the size limit is 413 before it is read.
"""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from aiohttp import web
from tritonclient.grpc import service_pb2 as triton_pb

from meshnode.api.http.codec import (
    HEADER_LENGTH,
    infer_request,
    infer_response,
    message_json,
    parameters_into,
    parse_json,
)
from meshnode.api.status import status_of
from meshnode.net import transport
from meshnode.net.tls import ServerTls
from meshpb import pb

Handler = Callable[[Any, Any], Awaitable[Any]]
Endpoint = Callable[[web.Request], Awaitable[web.StreamResponse]]

HTTP_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNKNOWN: 500, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
}  # every other code: 400
_MODEL = "/v2/models/{name}"
_VERSION = "/v2/models/{name}/versions/{version}"


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class RestContext:
    """What the gRPC handlers (and api.access) read of a call, from an HTTP request: headers as metadata."""

    def __init__(self, request: web.Request) -> None:
        self._metadata = tuple((key.lower(), value) for key, value in request.headers.items())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer_identities(self) -> None:
        return None  # client certificates stay gRPC's; REST callers present bearer tokens

    def time_remaining(self) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str,
                    trailing_metadata: tuple[tuple[str, str], ...] = ()) -> None:
        # The failing node (meshserve-node) rides in gRPC's trailers; a REST error is its body alone.
        raise Aborted(code, details)


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Endpoint) -> web.StreamResponse:
    try:
        return await handler(request)
    except Aborted as aborted:
        return error(HTTP_STATUS.get(aborted.code, 400), str(aborted))
    except web.HTTPException as refused:  # aiohttp's own: no route (404), wrong method (405), too large (413)
        if refused.status < 400:
            raise
        return error(refused.status, refused.reason if refused.status != 413 else refused.text or refused.reason)
    except (ConnectionError, OSError) as broken:  # the body ended before its Content-Length
        return error(400, f"the request body could not be read: {broken}")
    except Exception as failed:  # the codec's InvalidInput, or a bug (logged by status_of)
        code, message = status_of(failed)
        return error(HTTP_STATUS.get(code, 400), message)


class RestServer:
    def __init__(self, handlers: Mapping[str, Handler], max_request_bytes: int) -> None:
        self._handlers = handlers  # the gRPC methods' guarded handlers (api.access)
        self._app = web.Application(client_max_size=max_request_bytes, middlewares=[_errors])
        self._app.add_routes(self._routes())
        self._runner: web.AppRunner | None = None
        self.port = 0

    def _routes(self) -> list[web.RouteDef]:
        routes = [
            web.get("/v2/health/live", self._live), web.get("/v2/health/ready", self._ready),
            web.get("/v2", self._server_metadata), web.get("/v2/models/stats", self._statistics),
            web.post("/v2/repository/index", self._index),
            web.post("/v2/repository/models/{name}/load", self._load),
            web.post("/v2/repository/models/{name}/unload", self._unload),
            web.get("/v2/logging", self._log_settings), web.post("/v2/logging", self._log_settings),
            web.get("/v2/trace/setting", self._trace_setting), web.post("/v2/trace/setting", self._trace_setting),
        ]
        for base in (_MODEL, _VERSION):
            routes += [web.get(base, self._model_metadata), web.get(base + "/ready", self._model_ready),
                       web.get(base + "/config", self._model_config), web.get(base + "/stats", self._statistics),
                       web.post(base + "/infer", self._infer)]
        for kind in ("system", "cuda"):
            memory = f"/v2/{kind}sharedmemory"
            routes += [web.get(memory + "/status", self._memory_status),
                       web.get(memory + "/region/{region}/status", self._memory_status),
                       web.post(memory + "/region/{region}/register", self._memory_register),
                       web.post(memory + "/unregister", self._memory_unregister),
                       web.post(memory + "/region/{region}/unregister", self._memory_unregister)]
        return routes

    async def start(self, host: str, port: int, tls: ServerTls | None = None) -> int:
        """Serve on host:port (0: a free port), over TLS as the gRPC client port is; returns the bound port."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=ssl_context(tls) if tls is not None else None).start()
        self.port = sock.getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _call(self, method: str, message: Any, request: web.Request) -> Any:
        return await self._handlers[method](message, RestContext(request))

    async def _body(self, request: web.Request, what: str) -> dict[str, Any]:
        document = parse_json(await request.read(), what)
        if not isinstance(document, dict):
            raise Aborted(grpc.StatusCode.INVALID_ARGUMENT, f"{what} must be a JSON object")
        return document

    async def _live(self, request: web.Request) -> web.Response:
        live = (await self._call("ServerLive", pb.ServerLiveRequest(), request)).live
        return web.json_response({"live": live}, status=200 if live else 400)

    async def _ready(self, request: web.Request) -> web.Response:
        ready = (await self._call("ServerReady", pb.ServerReadyRequest(), request)).ready
        return web.json_response({"ready": ready}, status=200 if ready else 400)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(message_json(await self._call("ServerMetadata", pb.ServerMetadataRequest(), request)))

    async def _model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        found = await self._call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version), request)
        return web.json_response(message_json(found))

    async def _model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        ready = (await self._call("ModelReady", pb.ModelReadyRequest(name=name, version=version), request)).ready
        return web.json_response({"ready": ready}, status=200 if ready else 400)

    async def _model_config(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        found = await self._call("ModelConfig", triton_pb.ModelConfigRequest(name=name, version=version), request)
        return web.json_response(message_json(found.config, defaults=True))

    async def _statistics(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        found = await self._call("ModelStatistics", triton_pb.ModelStatisticsRequest(name=name, version=version),
                                 request)
        return web.json_response(message_json(found, defaults=True))

    async def _infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        raw = await request.read()
        transport.REQUEST_BYTES.set(len(raw))  # the body's size for the metrics, as gRPC's edge records it
        message, binary_all, binary_names = infer_request(name, version, raw, request.headers.get(HEADER_LENGTH))
        body, header_length = infer_response(await self._call("ModelInfer", message, request), binary_all,
                                             binary_names)
        if (report := transport.RESPONSE_BYTES_TO.get()) is not None:
            report(len(body))
        if header_length == len(body):
            return web.Response(body=body, content_type="application/json")
        return web.Response(body=body, content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(header_length)})

    async def _index(self, request: web.Request) -> web.Response:
        document = await self._body(request, "the index request")
        found = await self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=bool(document.get("ready"))),
                                 request)
        return web.json_response([message_json(model) for model in found.models])

    async def _load(self, request: web.Request) -> web.Response:
        message = pb.RepositoryModelLoadRequest(model_name=request.match_info["name"])
        parameters = (await self._body(request, "the load request")).get("parameters", {})
        files = {k: v for k, v in parameters.items() if k.startswith("file:")} if isinstance(parameters, dict) else {}
        try:
            for key, content in files.items():
                message.parameters[key].bytes_param = base64.b64decode(content, validate=True)
        except (ValueError, TypeError):
            raise Aborted(grpc.StatusCode.INVALID_ARGUMENT, f"load parameters {', '.join(files)} must be base64 "
                          "text (a model file's content)") from None
        parameters_into(message.parameters, {k: v for k, v in parameters.items() if k not in files},
                        "the load request")
        await self._call("RepositoryModelLoad", message, request)
        return web.json_response({})

    async def _unload(self, request: web.Request) -> web.Response:
        message = pb.RepositoryModelUnloadRequest(model_name=request.match_info["name"])
        parameters_into(message.parameters, (await self._body(request, "the unload request")).get("parameters", {}),
                        "the unload request")
        await self._call("RepositoryModelUnload", message, request)
        return web.json_response({})

    async def _log_settings(self, request: web.Request) -> web.Response:
        message = triton_pb.LogSettingsRequest()
        for key, value in (await self._body(request, "the log settings")).items():
            setting = message.settings[key]
            if isinstance(value, bool):
                setting.bool_param = value
            elif isinstance(value, int):
                setting.uint32_param = value
            else:
                setting.string_param = str(value)
        found = await self._call("LogSettings", message, request)
        return web.json_response({key: getattr(value, value.WhichOneof("parameter_choice"))
                                  for key, value in found.settings.items()})

    async def _trace_setting(self, request: web.Request) -> web.Response:
        message = triton_pb.TraceSettingRequest()
        for key, value in (await self._body(request, "the trace settings")).items():
            message.settings[key].value.extend(value if isinstance(value, list) else [str(value)])
        found = await self._call("TraceSetting", message, request)
        return web.json_response({key: list(value.value) for key, value in found.settings.items()})

    def _memory_method(self, request: web.Request, action: str) -> str:
        return f"{'Cuda' if request.path.startswith('/v2/cuda') else 'System'}SharedMemory{action}"

    async def _memory_status(self, request: web.Request) -> web.Response:
        method = self._memory_method(request, "Status")
        found = await self._call(method, getattr(triton_pb, method + "Request")(
            name=request.match_info.get("region", "")), request)
        return web.json_response([message_json(region) for region in found.regions.values()])

    async def _memory_register(self, request: web.Request) -> web.Response:
        method = self._memory_method(request, "Register")
        await self._call(method, getattr(triton_pb, method + "Request")(name=request.match_info["region"]), request)
        return web.json_response({})

    async def _memory_unregister(self, request: web.Request) -> web.Response:
        method = self._memory_method(request, "Unregister")
        await self._call(method, getattr(triton_pb, method + "Request")(name=request.match_info.get("region", "")),
                         request)
        return web.json_response({})


def ssl_context(tls: ServerTls) -> ssl.SSLContext:
    """The client port's certificate (read once, at start) and, with a client CA, client certificates required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(tls.client_ca)
    return context


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info.get("name", ""), request.match_info.get("version", "")
