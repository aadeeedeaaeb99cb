"""A store's failures become the node's errors with the status a client can act on, each naming the URI
as shown, never its credentials."""

from __future__ import annotations

import aiohttp
import botocore.exceptions
import grpc
import pytest
from yarl import URL

from meshnode.storage.store_errors import store_errors, translate
from meshnode.storage.uris import parse_uri
from router.errors import MeshError

URI = parse_uri("https://user:pw@host/m.tgz?X-Amz-Signature=secret")


def _http(status: int) -> aiohttp.ClientResponseError:
    info = aiohttp.RequestInfo(URL("https://host/m.tgz"), "GET", {}, URL("https://host/m.tgz"))  # type: ignore[arg-type]
    return aiohttp.ClientResponseError(info, (), status=status, message="status")


def _boto(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _wrapped(cause: Exception, outer: type[OSError] = OSError) -> OSError:
    error = outer("unknown store error")
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(("error", "code"), [
    (FileNotFoundError("The specified bucket does not exist"), grpc.StatusCode.NOT_FOUND),
    (PermissionError("InvalidAccessKeyId"), grpc.StatusCode.PERMISSION_DENIED),
    (_http(403), grpc.StatusCode.PERMISSION_DENIED),
    (_http(401), grpc.StatusCode.PERMISSION_DENIED),
    (_wrapped(_boto("Forbidden", 403)), grpc.StatusCode.PERMISSION_DENIED),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), grpc.StatusCode.UNAVAILABLE),
    (ConnectionRefusedError(111, "refused"), grpc.StatusCode.UNAVAILABLE),
    (TimeoutError(), grpc.StatusCode.UNAVAILABLE),
    (_http(503), grpc.StatusCode.UNAVAILABLE),
    (_wrapped(_boto("SlowDown", 503)), grpc.StatusCode.UNAVAILABLE),
    (_http(418), grpc.StatusCode.INTERNAL),
    # fsspec's http filesystem: every failure is a FileNotFoundError from the real one
    (_wrapped(_http(404), FileNotFoundError), grpc.StatusCode.NOT_FOUND),
    (_wrapped(_http(403), FileNotFoundError), grpc.StatusCode.PERMISSION_DENIED),
    (_wrapped(ConnectionRefusedError(111, "refused"), FileNotFoundError), grpc.StatusCode.UNAVAILABLE),
    (_wrapped(_boto("NoSuchKey", 404)), grpc.StatusCode.NOT_FOUND),
    (OSError("disk full"), grpc.StatusCode.INTERNAL),
    (ValueError("bad"), grpc.StatusCode.INTERNAL),
])
def test_each_failure_has_its_status(error: Exception, code: grpc.StatusCode) -> None:
    translated = translate(URI, "download", error)
    assert translated.code == code
    assert str(translated).startswith("storage_uri 'https://host/m.tgz': download failed")


def test_unavailable_may_succeed_on_another_node_and_denied_may_not() -> None:
    assert translate(URI, "listing", TimeoutError()).retry_elsewhere
    assert not translate(URI, "listing", PermissionError()).retry_elsewhere


def test_credentials_in_the_cause_are_never_echoed() -> None:
    with pytest.raises(MeshError) as raised, store_errors(URI, "download"):
        raise OSError(f"cannot read {URI.text}")
    assert "pw" not in str(raised.value) and "secret" not in str(raised.value)
    assert "cannot read https://host/m.tgz" in str(raised.value)


def test_a_mesh_error_passes_through_untouched() -> None:
    original = MeshError("already clear")
    with pytest.raises(MeshError) as raised, store_errors(URI, "download"):
        raise original
    assert raised.value is original
