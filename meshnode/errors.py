"""One exception root for the node, and the one table that maps it to gRPC status.

Everything below the servicers raises these; only meshnode.api.inference turns them into statuses,
with the codes and messages a Triton client is written against.
"""

from __future__ import annotations

import grpc

from router.errors import MeshError


class Internal(MeshError):
    """The runtime failed in a way that says nothing about the input (a crashed session, Triton's
    own INTERNAL)."""

    code = grpc.StatusCode.INTERNAL


class InvalidInput(MeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND

    @classmethod
    def unknown(cls, name: str) -> ModelNotFound:
        # Triton's exact wording: clients and dashboards match on it.
        return cls(f"Request for unknown model: '{name}' is not found")

    @classmethod
    def no_version(cls, name: str, version: str) -> ModelNotFound:
        return cls(f"Request for unknown model: '{name}' version {version} is not found")


class ModelUnavailable(MeshError):
    """The model exists but cannot serve now (load failed recently, unloading, draining)."""

    code = grpc.StatusCode.UNAVAILABLE
    retry_elsewhere = True


class ModelLost(ModelUnavailable):
    """The runtime no longer has a model the node holds as loaded (a Triton that restarted): the node
    forgets its copy, and the request is served by loading it again."""


class LoadFailed(MeshError):
    """A load failed; the message names the model and the cause. Another node may succeed.

    INTERNAL, as Triton answers a failed load (a broken model file, a runtime's error); a load that failed for
    a cause with a status a client can act on keeps that status (`because`)."""

    code = grpc.StatusCode.INTERNAL
    retry_elsewhere = True

    # The causes' statuses a failed load keeps: the model has no such version or is not registered
    # (NOT_FOUND), no node has room for it (RESOURCE_EXHAUSTED), the request's fields are wrong (INVALID_ARGUMENT),
    # the load may succeed later or elsewhere (UNAVAILABLE: it timed out, the runtime is unreachable).
    KEPT_CODES = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE})

    @classmethod
    def because(cls, message: str, cause: BaseException) -> LoadFailed:
        """A failed load with `message`, answering the cause's status when it is one of KEPT_CODES (and
        whether another node may succeed as the cause says), else INTERNAL."""
        error = cls(message)
        if isinstance(cause, MeshError) and cause.code in cls.KEPT_CODES:
            error.code = cause.code
            error.retry_elsewhere = cause.retry_elsewhere
        return error


class PermissionDenied(MeshError):
    """The store refused the node's credentials for an object (bad key, no access)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class StorageUnavailable(MeshError):
    """The model store cannot be reached now; a node that has the model on disk may still serve it."""

    code = grpc.StatusCode.UNAVAILABLE
    retry_elsewhere = True


class ResourceExhausted(MeshError):
    """No room on this node; another node may have it."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_elsewhere = True


class AlreadyExists(MeshError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unsupported(MeshError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(MeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(MeshError):
    """The request is valid but the mesh's state refuses it (e.g. unregistering an alias's model)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(MeshError):
    """A concurrent change won a compare-and-set; nothing was changed, the caller may try again."""

    code = grpc.StatusCode.ABORTED
