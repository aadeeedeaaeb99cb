"""Errors and values of the etcd layer (meshnode.etcd.store re-exports them all)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import grpc

from router.errors import MeshError

_TRANSIENT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class EtcdError(MeshError):
    """etcd refused a request (too large, out of space, ...); etcd_status is its gRPC status."""

    def __init__(self, message: str, etcd_status: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.etcd_status = etcd_status


class EtcdUnavailable(EtcdError):
    """etcd did not answer within the retry window; the operation may or may not have happened."""

    code = grpc.StatusCode.UNAVAILABLE


class EtcdConflict(EtcdError):
    """An update lost the compare-and-set race more times than it was allowed to retry."""

    code = grpc.StatusCode.ABORTED


class WatchResync(EtcdError):
    """The watch cannot resume where it stopped (history compacted, or etcd lost its data): list again."""

    code = grpc.StatusCode.UNAVAILABLE


class Entry(NamedTuple):
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: Literal["put", "delete"]
    key: str
    value: bytes  # empty for a delete
    mod_revision: int  # for a delete: the revision of the deletion


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int


def grpc_status(error: BaseException) -> grpc.StatusCode | None:
    """The status of a failed call, from gRPC's error or from the aetcd error wrapping it."""
    for e in (error, error.__cause__):
        if isinstance(e, grpc.aio.AioRpcError):
            return e.code()
    return None


def is_transient(error: BaseException) -> bool:
    """Connection lost, refused or timed out: worth retrying, the outcome of a write is unknown."""
    return grpc_status(error) in _TRANSIENT_CODES
