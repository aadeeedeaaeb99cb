"""A model store reached through fsspec: what a URI holds (sizes and ETags), downloading it verified, the
Triton-layout models under a repository prefix, and writing a model's files to the store.

Blocking calls (fsspec's sync API, which runs s3fs/aiohttp on fsspec's own IO thread); the async methods
run them in a worker thread so the event loop never waits on the network.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from meshnode.errors import InvalidInput, LoadFailed, ModelNotFound
from meshnode.storage.repository import ModelRepository, directory_files
from meshnode.storage.store_errors import store_errors
from meshnode.storage.uris import StorageUri, StoreOptions, open_store, parse_uri

_MD5 = re.compile(r"[0-9a-f]{32}")
HTTP_SCHEMES = ("http", "https")
S3_SCHEMES = ("s3", "s3a")
# What botocore checks without the optional awscrt package; CRC32C and CRC64NVME need it.
SDK_CHECKSUMS = frozenset({"CRC32", "SHA1", "SHA256"})


@dataclass(frozen=True, slots=True)
class RemoteObject:
    """One object of a model: its path under the model's URI ('' when the URI names the object itself), its
    size (-1 when the store does not say), its version tag (ETag, else Last-Modified or mtime, else '') and
    the checksum the store keeps of it, as S3 lists it ('CRC32'; '' when it lists none)."""

    relative: str
    size: int
    tag: str
    checksum: str = ""

    @property
    def checked_by_sdk(self) -> bool:
        """botocore validates the object's checksum itself while it streams a GET (response checksum
        validation, on by default) for these algorithms; an MD5 pass over the file would only repeat it."""
        return self.checksum in SDK_CHECKSUMS


@dataclass(frozen=True, slots=True)
class Listing:
    """What a URI holds now: one object (a model file or an archive), or every object under a prefix."""

    single: bool
    objects: tuple[RemoteObject, ...]

    @property
    def total_bytes(self) -> int:
        return sum(max(o.size, 0) for o in self.objects)

    def as_json(self) -> dict[str, Any]:
        return {"single": self.single, "objects": [[o.relative, o.size, o.tag, o.checksum] for o in self.objects]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Listing:
        return cls(bool(data["single"]), tuple(RemoteObject(str(r), int(s), str(t), str(c))
                                               for r, s, t, c in data["objects"]))


class ObjectStore:
    def __init__(self, options: StoreOptions) -> None:
        self._options = options

    def listing(self, uri: StorageUri) -> Listing:
        """Sizes and tags of what `uri` names, by listing (or one HEAD), never reading an object.

        ModelNotFound when nothing is there, PermissionDenied, StorageUnavailable, or LoadFailed."""
        fs, path = open_store(uri, self._options)
        with store_errors(uri, "listing"):
            if uri.scheme in HTTP_SCHEMES:
                found: dict[str, Any] = {path: fs.info(path)}
            elif uri.scheme in S3_SCHEMES and "/" in path:
                found = _s3_find(fs, path)
            else:
                found = fs.find(path, detail=True)
            if not found:
                raise FileNotFoundError(f"no object at or under '{path}'")
            if len(found) > 1:
                found.pop(path, None)  # an object beside a prefix of the same name: the prefix is the model
            if list(found) == [path]:
                info = found[path] if "size" in found[path] else fs.info(path)
                return Listing(True, (RemoteObject("", _size(info), _tag(info), _checksum(info)),))
        objects = [RemoteObject(_relative(uri, path, name), _size(info), _tag(info), _checksum(info))
                   for name, info in sorted(found.items()) if _is_object(name, info)]
        if not objects:  # only "directory" markers
            raise ModelNotFound(f"storage_uri '{uri.shown}': listing failed: not found in the store (no object "
                                f"under '{path}')")
        return Listing(False, tuple(objects))

    def fetch(self, uri: StorageUri, listing: Listing, target: Path) -> Path:
        """Downloads what `listing` names into the directory `target` and verifies each file against its size
        and, where the ETag is an MD5, its content; returns the local model (the file, or `target`)."""
        fs, path = open_store(uri, self._options)
        if listing.single:
            pairs = [(path, target / uri.basename)]
        else:
            pairs = [(f"{path}/{o.relative}", target.joinpath(*PurePosixPath(o.relative).parts))
                     for o in listing.objects]
        for _, local in pairs:
            local.parent.mkdir(parents=True, exist_ok=True)
        with store_errors(uri, "download"):
            fs.get([remote for remote, _ in pairs], [str(local) for _, local in pairs])
        check_md5 = uri.scheme in S3_SCHEMES and self._options.s3_verify_md5
        for obj, (_, local) in zip(listing.objects, pairs, strict=True):
            verify_download(uri, obj, local, check_md5)
        return pairs[0][1] if listing.single else target

    async def list_models(self, repository_uri: str) -> dict[str, str]:
        return await asyncio.to_thread(self.list_models_now, repository_uri)

    def list_models_now(self, repository_uri: str) -> dict[str, str]:
        """{name: model URI} of the Triton layout under a prefix: a model is a top-level "directory" holding a
        numeric version directory with at least one object. Names starting with '.' are skipped."""
        uri = parse_uri(repository_uri)
        if uri.is_local:
            return {name: str(path) for name, path in _local_repository(uri).scan().items()}
        if uri.scheme in HTTP_SCHEMES:
            raise InvalidInput(f"model repository '{uri.shown}': an http(s) server cannot be listed; "
                               "use a store (s3://, gs://, ...) or a local path")
        fs, path = open_store(uri, self._options)
        with store_errors(uri, "listing"):
            try:
                names = fs.find(path)
            except FileNotFoundError:
                names = []
        models: set[str] = set()
        for name in names:
            parts = name[len(path) + 1:].split("/") if name.startswith(path + "/") else []
            if len(parts) >= 3 and parts[1].isdigit() and not parts[0].startswith(".") and all(parts):
                models.add(parts[0])
        return {model: fs.unstrip_protocol(f"{path}/{model}") for model in sorted(models)}

    async def write_model(self, store_uri: str, name: str, files: Mapping[str, bytes]) -> str:
        return await asyncio.to_thread(self.write_model_now, store_uri, name, files)

    def write_model_now(self, store_uri: str, name: str, files: Mapping[str, bytes]) -> str:
        """Writes a model's files ('1/model.onnx' -> bytes) under STORE/NAME and returns the model's URI.

        Every path is checked before anything is written (InvalidInput: '..', absolute, NUL, clashes); a
        local store gets each file atomically, an object store gets each object in one PUT. The objects appear
        one by one: a listing taken meanwhile may show the model before its last file (its load then fails and
        is retried after the back-off)."""
        uri = parse_uri(store_uri)
        if uri.is_local:
            return str(_local_repository(uri).store_files(name, dict(files)))
        if uri.scheme in HTTP_SCHEMES:
            raise InvalidInput(f"model store '{uri.shown}': cannot write to an http(s) server")
        fs, path = open_store(uri, self._options)
        with tempfile.TemporaryDirectory(prefix="meshserve-upload-") as staging:
            # The local repository's checks and layout, then the same tree to the store.
            model_dir = ModelRepository(Path(staging)).store_files(name, dict(files))
            local = directory_files(model_dir)
            remote = [f"{path}/{name}/{p.relative_to(model_dir).as_posix()}" for p in local]
            with store_errors(uri, "upload"):
                fs.put([str(p) for p in local], remote)
        return str(fs.unstrip_protocol(f"{path}/{name}"))


def verify_download(uri: StorageUri, obj: RemoteObject, local: Path, check_md5: bool) -> None:
    """LoadFailed unless the downloaded file has the listed size and, if `check_md5`, the ETag is an MD5 and the
    SDK did not check a checksum of its own, that content: a partial or corrupt download is never kept."""
    name = obj.relative or uri.basename
    try:
        size = local.stat().st_size
    except FileNotFoundError:
        raise LoadFailed(f"storage_uri '{uri.shown}': object '{name}' was not downloaded") from None
    if obj.size >= 0 and size != obj.size:
        raise LoadFailed(f"storage_uri '{uri.shown}': object '{name}' is truncated: {size} of {obj.size} "
                         "bytes downloaded")
    md5 = _md5_of(obj.tag) if check_md5 and not obj.checked_by_sdk else None
    if md5 is not None:
        with local.open("rb") as file:
            actual = hashlib.file_digest(file, "md5").hexdigest()
        if actual != md5:
            raise LoadFailed(f"storage_uri '{uri.shown}': object '{name}' does not match its ETag (corrupt, "
                             "or changed during the download)")


def _s3_find(fs: Any, path: str) -> dict[str, Any]:
    """What is at `path` and under `path/`, in one listing of the parent's keys starting with the name (s3fs's
    HEAD-then-list would take two requests, and a HEAD does not say which checksum S3 keeps of an object).
    Keys of siblings that share the name's beginning (m, m2/...) come along and are dropped."""
    parent, _, name = path.rpartition("/")
    found = fs.find(parent, prefix=name, detail=True)
    return {key: info for key, info in found.items() if key == path or key.startswith(path + "/")}


def _local_repository(uri: StorageUri) -> ModelRepository:
    text = uri.text.removeprefix("file://")
    if "\x00" in text:
        raise InvalidInput(f"model repository '{uri.shown}' contains a NUL byte")
    return ModelRepository(Path(text).expanduser())


def _relative(uri: StorageUri, root: str, name: str) -> str:
    """An object's path under the model's prefix; a key that would land outside the local copy fails."""
    relative = name[len(root) + 1:] if name.startswith(root + "/") else ""
    if not relative or any(part in ("", ".", "..") for part in relative.split("/")):
        raise LoadFailed(f"storage_uri '{uri.shown}': unsafe object name '{name}' under the model's prefix")
    return relative


def _is_object(name: str, info: Mapping[str, Any]) -> bool:
    """A file, not a "directory" marker: S3 consoles and tools create empty keys ending in '/' for folders."""
    return info.get("type", "file") == "file" and not name.endswith("/")


def _size(info: Mapping[str, Any]) -> int:
    size = info.get("size")
    return int(size) if size is not None else -1


def _tag(info: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "Last-Modified", "LastModified", "mtime", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _checksum(info: Mapping[str, Any]) -> str:
    algorithms = info.get("ChecksumAlgorithm") or []
    return str(algorithms[0]) if isinstance(algorithms, list) and len(algorithms) == 1 else ""


def _md5_of(tag: str) -> str | None:
    """The MD5 an S3 ETag is, when it is one: single-part uploads without SSE-KMS/SSE-C."""
    text = tag.strip('"').lower()
    return text if _MD5.fullmatch(text) else None
