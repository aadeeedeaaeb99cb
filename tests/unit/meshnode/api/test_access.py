"""Access: roles from bearer tokens and client certificates; members may do everything and send hops."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from meshnode.api.access import Access, Credentials, Role, from_member, read_credentials
from meshnode.net.proof import MeshProof

ADMIN, READER = b"admin-secret-token", b"reader-secret-token"
CREDENTIALS = Credentials(((ADMIN, Role.ADMIN), (READER, Role.READER)), {"ops-reader": Role.READER})


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class Context:
    def __init__(self, metadata: tuple[tuple[str, str], ...] = (), identities: tuple[bytes, ...] = ()) -> None:
        self._metadata = metadata
        self._identities = identities

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer_identities(self) -> tuple[bytes, ...] | None:
        return self._identities or None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


async def handler(request: Any, context: Any) -> tuple[Any, bool]:
    return request, from_member()


async def call(access: Access, method: str, context: Context) -> tuple[Any, bool]:
    result: tuple[Any, bool] = await access.guard({method: handler})[method]("req", context)
    return result


def bearer(token: bytes) -> tuple[tuple[str, str], ...]:
    return (("authorization", "Bearer " + token.decode()),)


@pytest.mark.parametrize(("method", "metadata", "code"), [
    ("RegisterModel", (), grpc.StatusCode.UNAUTHENTICATED),
    ("ListModels", bearer(b"wrong-token"), grpc.StatusCode.UNAUTHENTICATED),
    ("RegisterModel", bearer(READER), grpc.StatusCode.PERMISSION_DENIED),
    ("RepositoryModelLoad", bearer(READER), grpc.StatusCode.PERMISSION_DENIED),
])
async def test_refusals_name_what_is_needed_and_never_the_token(method: str, metadata: tuple[tuple[str, str], ...],
                                                                code: grpc.StatusCode) -> None:
    access = Access(members=False, credentials=CREDENTIALS)
    with pytest.raises(Aborted) as refused:
        await call(access, method, Context(metadata))
    assert refused.value.code == code
    assert "role" in refused.value.details and method in refused.value.details
    assert all(t.decode() not in refused.value.details for t in (ADMIN, READER, b"wrong-token"))


async def test_roles_allow_what_they_cover() -> None:
    access = Access(members=False, credentials=CREDENTIALS)
    assert await call(access, "ListModels", Context(bearer(READER))) == ("req", False)
    assert await call(access, "RegisterModel", Context(bearer(ADMIN))) == ("req", False)
    assert await call(access, "ListNodes", Context(identities=(b"ops-reader",))) == ("req", False)
    # Inference needs nothing unless asked to.
    assert await call(access, "ModelInfer", Context()) == ("req", False)
    with pytest.raises(Aborted):
        await call(Access(members=False, credentials=CREDENTIALS, require_for_infer=True), "ModelInfer", Context())
    assert await call(Access(members=False, credentials=CREDENTIALS, require_for_infer=True), "ModelInfer",
                      Context(bearer(READER))) == ("req", False)


async def test_without_credentials_configured_nothing_is_checked() -> None:
    assert await call(Access(members=False), "UnregisterModel", Context()) == ("req", False)


async def test_members_may_do_everything_and_are_told_apart() -> None:
    proof = MeshProof(b"0123456789abcdef")
    access = Access(members=False, credentials=CREDENTIALS, proof=proof)
    assert await call(access, "RepositoryModelLoad", Context((proof.sign("RepositoryModelLoad"),))) == ("req", True)
    # A proof for another method, or replayed, proves nothing.
    with pytest.raises(Aborted):
        await call(access, "RepositoryModelLoad", Context((proof.sign("ModelInfer"),)))
    signed = proof.sign("ModelInfer")
    assert await call(access, "ModelInfer", Context((signed,))) == ("req", True)
    assert await call(access, "ModelInfer", Context((signed,))) == ("req", False)
    assert await call(Access(members=True, credentials=CREDENTIALS), "SetAlias", Context()) == ("req", True)


async def test_streaming_handlers_are_guarded_too() -> None:
    async def stream(requests: Any, context: Any) -> AsyncIterator[bool]:
        yield from_member()

    guarded = Access(members=False, credentials=CREDENTIALS, require_for_infer=True).guard(
        {"ModelStreamInfer": stream})["ModelStreamInfer"]
    with pytest.raises(Aborted):
        [r async for r in guarded(None, Context())]
    assert [r async for r in guarded(None, Context(bearer(ADMIN)))] == [False]


def test_the_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# comment\nabc admin\n\ndef Reader  # trailing\ncert:node-x admin\n")
    read = read_credentials(path)
    assert read.tokens == ((b"abc", Role.ADMIN), (b"def", Role.READER))
    assert read.identities == {"node-x": Role.ADMIN}
    path.write_text("s3cr3t-value superuser\n")
    with pytest.raises(ValueError) as bad:
        read_credentials(path)
    assert "s3cr3t-value" not in str(bad.value) and ":1:" in str(bad.value)
