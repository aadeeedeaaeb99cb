"""The REST server in process over fake handlers: routes to the gRPC methods, statuses, TLS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import trustme

from meshnode.api.http.server import HTTP_STATUS, RestServer, ssl_context
from meshnode.errors import ModelNotFound
from meshnode.net.tls import ServerTls
from meshpb import pb
from router.errors import Overloaded


class Handlers(dict[str, Any]):
    """Fake gRPC handlers: each records the request and the metadata it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, Any, Any]] = []
        for method, answer in (("ServerLive", pb.ServerLiveResponse(live=True)),
                               ("ServerReady", pb.ServerReadyResponse(ready=False)),
                               ("ModelReady", pb.ModelReadyResponse(ready=True))):
            self[method] = self._answer(method, answer)

    def _answer(self, method: str, answer: Any) -> Any:
        async def handler(request: Any, context: Any) -> Any:
            self.seen.append((method, request, context.invocation_metadata()))
            return answer
        return handler


@pytest.fixture
async def served() -> AsyncIterator[tuple[Handlers, str]]:
    handlers = Handlers()
    server = RestServer(handlers, max_request_bytes=1000)
    port = await server.start("127.0.0.1", 0)
    try:
        yield handlers, f"http://127.0.0.1:{port}"
    finally:
        await server.close()


async def test_routes_call_the_grpc_methods_with_headers_as_metadata(served: tuple[Handlers, str]) -> None:
    handlers, url = served
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v2/health/live") as response:
            assert response.status == 200 and await response.json() == {"live": True}
        async with session.get(f"{url}/v2/health/ready") as response:
            assert response.status == 400 and await response.json() == {"ready": False}
        async with session.get(f"{url}/v2/models/m/versions/3/ready", headers={"Meshserve-Scope": "node"}) as response:
            assert response.status == 200
    method, request, metadata = handlers.seen[-1]
    assert method == "ModelReady" and (request.name, request.version) == ("m", "3")
    assert ("meshserve-scope", "node") in metadata


async def test_errors_answer_json_with_triton_s_statuses(served: tuple[Handlers, str]) -> None:
    handlers, url = served

    def failing(error: Exception) -> Any:
        async def handler(request: Any, context: Any) -> Any:
            raise error
        return handler

    async with aiohttp.ClientSession() as session:
        for error, status in ((ModelNotFound.unknown("m"), 404), (Overloaded("too busy"), 429)):
            handlers["ModelMetadata"] = failing(error)
            async with session.get(f"{url}/v2/models/m") as response:
                assert response.status == status and (await response.json())["error"] == str(error)
        async with session.post(f"{url}/v2/models/m/infer", data=b"x" * 1001) as response:
            assert response.status == 413 and "error" in await response.json()
        async with session.get(f"{url}/v2/elsewhere") as response:
            assert response.status == 404 and "error" in await response.json()
        async with session.put(f"{url}/v2/health/live") as response:
            assert response.status == 405


def test_codes_without_an_http_status_of_their_own_are_400() -> None:
    assert HTTP_STATUS.get(grpc.StatusCode.INVALID_ARGUMENT, 400) == 400
    assert HTTP_STATUS[grpc.StatusCode.UNAVAILABLE] == 503 and HTTP_STATUS[grpc.StatusCode.UNIMPLEMENTED] == 501


def test_tls_with_a_client_ca_requires_client_certificates(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "both.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    both = tmp_path / "both.pem"
    assert ssl_context(ServerTls(both, both)).verify_mode.name == "CERT_NONE"
    assert ssl_context(ServerTls(both, both, tmp_path / "ca.pem")).verify_mode.name == "CERT_REQUIRED"
