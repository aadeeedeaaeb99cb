"""The one translation of a store's failures (fsspec, s3fs/botocore, aiohttp, the OS) into the node's errors.

Every message names the URI as shown (no credentials, no presigned query) and the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import aiohttp
import botocore.exceptions

from meshnode.errors import LoadFailed, ModelNotFound, PermissionDenied, StorageUnavailable
from meshnode.storage.uris import StorageUri
from router.errors import MeshError

# The store did not answer: another node may still have the model on disk, and the store may come back.
UNREACHABLE = (botocore.exceptions.ConnectionError, aiohttp.ClientConnectionError, ConnectionError,
               TimeoutError, asyncio.TimeoutError)
DENIED_HTTP = frozenset({401, 403})
UNAVAILABLE_HTTP = frozenset({408, 429, 500, 502, 503, 504})


@contextlib.contextmanager
def store_errors(uri: StorageUri, action: str) -> Iterator[None]:
    """Runs a store call, raising what it failed with as a MeshError naming `uri` and `action`."""
    try:
        yield
    except MeshError:
        raise
    except Exception as error:
        raise translate(uri, action, error) from error


def translate(uri: StorageUri, action: str, error: Exception) -> MeshError:
    """The first error of the cause chain that says what happened decides: fsspec's http filesystem reports any
    failure (a refused connection, a 403) as FileNotFoundError from the real one, s3fs an unknown code as an
    OSError from botocore's."""
    where = f"storage_uri '{uri.shown}': {action} failed"
    chain = _chain(error)
    for link in chain:
        status = _status(link)
        if isinstance(link, PermissionError) or status in DENIED_HTTP:
            return PermissionDenied(f"{where}: permission denied ({cause(uri, link)})")
        if isinstance(link, UNREACHABLE) or status in UNAVAILABLE_HTTP:
            return StorageUnavailable(f"{where}: the store is unavailable ({cause(uri, link)})")
    if any(isinstance(link, FileNotFoundError) or _status(link) == 404 for link in chain):
        return ModelNotFound(f"{where}: not found in the store ({cause(uri, error)})")
    return LoadFailed(f"{where}: {cause(uri, error)}")


def cause(uri: StorageUri, error: BaseException) -> str:
    """The error's type and text, with the URI as given (credentials, a signature) replaced by its shown form."""
    text = str(error).replace(uri.text, uri.shown) if uri.text != uri.shown else str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain and len(chain) < 10:
        chain.append(link)
        link = link.__cause__
    return chain


def _status(error: BaseException) -> int | None:
    if isinstance(error, aiohttp.ClientResponseError):
        return error.status
    if isinstance(error, botocore.exceptions.ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status is not None else None
    return None
