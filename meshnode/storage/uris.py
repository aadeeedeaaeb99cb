"""Storage URIs: which filesystem a model location names, how it is shown in messages, and the node's store
options (endpoint, region, credentials) that open it.

A plain path or file:// is local and used in place; every other scheme is opened through fsspec (s3fs for
s3://, aiohttp for http(s)://, gcsfs or adlfs for gs:// and az:// when installed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import fsspec
from fsspec.core import url_to_fs

from meshnode.errors import InvalidInput

LOCAL_SCHEMES = ("", "file")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """How the node reaches its stores. A field left None falls back to the standard AWS variables and
    files (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ~/.aws/credentials, ...), as botocore reads them.

    `extra` holds fsspec storage options for other schemes ({"gs": {"token": ...}}), passed as given."""

    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = field(default=None, repr=False)
    s3_session_token: str | None = field(default=None, repr=False)
    s3_anonymous: bool = False
    # An S3 ETag that looks like an MD5 is checked against the download; off for stores whose ETags look like
    # one without being one (SSE-KMS and SSE-C objects).
    s3_verify_md5: bool = True
    # A store that is down: a refused connection fails after s3fs's own 5 tries (about 1 s of back-off,
    # measured), a silent one after connect_timeout_s each.
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    extra: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def storage_options(self, protocol: str) -> dict[str, Any]:
        """fsspec's keyword arguments for one protocol; listings are never cached, so a changed store shows."""
        options: dict[str, Any] = {"use_listings_cache": False, **self.extra.get(protocol, {})}
        if protocol in ("s3", "s3a"):
            options.update(self._s3_options())
        elif protocol in ("http", "https"):
            timeout = aiohttp.ClientTimeout(sock_connect=self.connect_timeout_s, sock_read=self.read_timeout_s)
            options.setdefault("client_kwargs", {"timeout": timeout})
        return options

    def _s3_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "anon": self.s3_anonymous,
            "config_kwargs": {"connect_timeout": self.connect_timeout_s, "read_timeout": self.read_timeout_s,
                              # s3fs retries on its own: botocore's retries on top would multiply the wait.
                              "retries": {"max_attempts": 1, "mode": "standard"}},
        }
        given = {"endpoint_url": self.s3_endpoint_url, "key": self.s3_access_key_id,
                 "secret": self.s3_secret_access_key, "token": self.s3_session_token}
        options.update({k: v for k, v in given.items() if v is not None})
        if self.s3_region is not None:
            options["client_kwargs"] = {"region_name": self.s3_region}
        return options


@dataclass(frozen=True, slots=True)
class StorageUri:
    """A parsed storage URI. `text` is as given (it may carry a presigned query); `shown` is safe to print."""

    text: str
    scheme: str
    shown: str

    @property
    def is_local(self) -> bool:
        return self.scheme in LOCAL_SCHEMES

    @property
    def is_archive(self) -> bool:
        return is_archive_name(urlsplit(self.text).path if not self.is_local else self.text)

    @property
    def cache_key(self) -> str:
        """The disk cache's name for this location: the same object under any presigned query or credentials."""
        return hashlib.sha256(self.shown.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    @property
    def basename(self) -> str:
        """The last path segment, a name for the local copy ('model' for s3://bucket/models/model/)."""
        path = urlsplit(self.text).path if not self.is_local else self.text
        return path.rstrip("/").rsplit("/", 1)[-1] or "model"


def parse_uri(text: str) -> StorageUri:
    """InvalidInput for what no store can hold: an empty URI, a NUL byte, a remote URI without a location."""
    if not text:
        raise InvalidInput("invalid storage_uri '': empty")
    if "\x00" in text:
        raise InvalidInput(f"storage_uri '{shown_uri(text)}' contains a NUL byte")
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme not in LOCAL_SCHEMES and not text.partition("://")[2].strip("/"):
        raise InvalidInput(f"invalid storage_uri '{shown_uri(text)}': no bucket or host")
    return StorageUri(text=text, scheme=scheme, shown=shown_uri(text))


def shown_uri(text: str) -> str:
    """The URI without what may be a secret: user and password, and the query (a presigned URL's signature)."""
    if "://" not in text:
        return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    parts = urlsplit(text)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def open_store(uri: StorageUri, options: StoreOptions) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path in it of a URI; InvalidInput for a scheme fsspec does not know or whose
    package is not installed (fsspec's message says which package to install)."""
    try:
        fs, path = url_to_fs(uri.text, **options.storage_options(uri.scheme))
    except (ImportError, ValueError) as error:
        raise InvalidInput(f"storage_uri '{uri.shown}': unsupported scheme '{uri.scheme}': {error}") from None
    return fs, str(path).rstrip("/")
