"""A bucket of its own in fsspec's process-wide memory filesystem, for the store tests."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import fsspec
import pytest

Put = Callable[[str, dict[str, bytes]], None]


@pytest.fixture
def root() -> Iterator[str]:
    """The bucket's path ('memory:/' + root is its URI), removed after the test."""
    bucket = f"/bucket-{uuid.uuid4().hex[:8]}"
    yield bucket
    fs = fsspec.filesystem("memory")
    if fs.exists(bucket):
        fs.rm(bucket, recursive=True)


@pytest.fixture
def put() -> Put:
    """put(path, {relative: bytes}) writes objects under a memory path."""

    def write(path: str, files: dict[str, bytes]) -> None:
        fsspec.filesystem("memory").pipe({f"{path}/{relative}": data for relative, data in files.items()})

    return write
