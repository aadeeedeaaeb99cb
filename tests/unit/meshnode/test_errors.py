"""LoadFailed.because: a failed load answers INTERNAL (Triton's), or its cause's status when a client can act on it."""

from __future__ import annotations

import grpc
import pytest

from meshnode.errors import (
    DeadlineExceeded,
    InvalidInput,
    LoadFailed,
    ModelNotFound,
    ModelUnavailable,
    ResourceExhausted,
)
from router.errors import MeshError, NoPlacement, PeerError

Code = grpc.StatusCode


@pytest.mark.parametrize(("cause", "code", "retry_elsewhere"), [
    (ModelNotFound("no versions"), Code.NOT_FOUND, False),
    (ResourceExhausted("no room"), Code.RESOURCE_EXHAUSTED, True),
    (NoPlacement("no node"), Code.RESOURCE_EXHAUSTED, False),
    (InvalidInput("bad config"), Code.INVALID_ARGUMENT, False),
    (PeerError(Code.NOT_FOUND, "node n2: gone", retry_elsewhere=False), Code.NOT_FOUND, False),
    (LoadFailed("model file is corrupt"), Code.INTERNAL, True),  # Triton's answer to a failed load
    (DeadlineExceeded("timed out"), Code.INTERNAL, True),
    (PeerError(Code.UNAVAILABLE, "node n2: unreachable", retry_elsewhere=True), Code.UNAVAILABLE, True),
    (ModelUnavailable("load timed out"), Code.UNAVAILABLE, True),
    (ValueError("a bug"), Code.INTERNAL, True),
])
def test_a_failed_load_keeps_its_causes_status_only_when_a_client_can_act_on_it(
        cause: BaseException, code: grpc.StatusCode, retry_elsewhere: bool) -> None:
    error = LoadFailed.because("load failed for model 'm': why", cause)
    assert isinstance(error, LoadFailed) and isinstance(error, MeshError)
    assert (str(error), error.code, error.retry_elsewhere) == ("load failed for model 'm': why", code, retry_elsewhere)
    assert LoadFailed.code == Code.INTERNAL  # the class is unchanged
