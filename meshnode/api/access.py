"""Who may call what: roles from bearer tokens or client certificates, and which callers are mesh members.

Every handler of a server goes through `Access.guard`, which refuses a caller without the role its method
needs (UNAUTHENTICATED without credentials, PERMISSION_DENIED with too small a role) and records whether
the caller is a mesh member, which `from_member()` answers for the handler: only a member's hop is honoured.
A member (a peer over mutual TLS on the peer port, or with a valid MeshProof) may call everything.
"""

from __future__ import annotations

import functools
import hmac
import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Protocol

import grpc

from meshnode.net.proof import PROOF_KEY, MeshProof

BEARER = "bearer "
IDENTITY_PREFIX = "cert:"  # in the tokens file: `cert:IDENTITY ROLE` maps a client certificate's name


class Role(IntEnum):
    READER = 1  # status and lists
    ADMIN = 2  # everything a reader may, and register, unregister, aliases, repository load and unload


# The role a method needs; INFER: none, unless --require-auth-for-infer (then any role).
INFER = "infer"
_NEEDED: dict[str, Role | str | None] = {
    "ServerLive": None, "ServerReady": None, "ServerMetadata": None,
    "ModelReady": INFER, "ModelMetadata": INFER, "ModelInfer": INFER, "ModelStreamInfer": INFER,
    "RepositoryIndex": Role.READER, "RepositoryModelLoad": Role.ADMIN, "RepositoryModelUnload": Role.ADMIN,
    "GetModelStatus": Role.READER, "ListModels": Role.READER, "GetAlias": Role.READER,
    "ListAliases": Role.READER, "ListNodes": Role.READER,
    "RegisterModel": Role.ADMIN, "UnregisterModel": Role.ADMIN, "SetAlias": Role.ADMIN, "DeleteAlias": Role.ADMIN,
    # Triton's other methods: a client asks config and shared memory before inferring; statistics are a status;
    # registering memory is refused anyway; trace and log settings change the node.
    "ModelConfig": INFER, "ModelStatistics": Role.READER, "SystemSharedMemoryStatus": INFER,
    "SystemSharedMemoryRegister": INFER, "SystemSharedMemoryUnregister": INFER, "CudaSharedMemoryStatus": INFER,
    "CudaSharedMemoryRegister": INFER, "CudaSharedMemoryUnregister": INFER, "TraceSetting": Role.ADMIN,
    "LogSettings": Role.ADMIN,
}  # fmt: skip

_MEMBER: ContextVar[bool] = ContextVar("meshserve_member", default=False)


class CallContext(Protocol):
    """What access reads of a call, from either kind of gRPC server's context (or api.http's)."""

    def invocation_metadata(self) -> Any: ...
    def peer_identities(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class Refusal:
    code: grpc.StatusCode
    message: str


def from_member() -> bool:
    """Within a guarded handler: did a proven mesh member make this call?"""
    return _MEMBER.get()


@dataclass(frozen=True)
class Credentials:
    tokens: tuple[tuple[bytes, Role], ...] = field(repr=False, default=())
    identities: Mapping[str, Role] = field(default_factory=dict)


def read_credentials(path: Path) -> Credentials:
    """The `--auth-tokens` file: `TOKEN ROLE` or `cert:IDENTITY ROLE` per line; `#` starts a comment."""
    tokens: list[tuple[bytes, Role]] = []
    identities: dict[str, Role] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        roles = {r.name.lower(): r for r in Role}
        if len(words) != 2 or words[1].lower() not in roles:
            # Never the line itself: it holds a token.
            raise ValueError(f"{path}:{number}: expected `TOKEN ROLE` with ROLE one of {', '.join(roles)}")
        role = roles[words[1].lower()]
        if words[0].startswith(IDENTITY_PREFIX):
            identities[words[0].removeprefix(IDENTITY_PREFIX)] = role
        else:
            tokens.append((words[0].encode(), role))
    return Credentials(tuple(tokens), identities)


class Access:
    """`members`: every caller is a member (the peer port, where mutual TLS admitted only mesh members, or a
    node with no mesh authentication configured at all). `credentials` None: no roles are checked."""

    def __init__(self, *, members: bool, credentials: Credentials | None = None, proof: MeshProof | None = None,
                 require_for_infer: bool = False) -> None:
        self._members = members
        self._credentials = credentials
        self._proof = proof
        self._infer_role = Role.READER if require_for_infer else None

    def guard(self, handlers: Mapping[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
        return {method: self._guarded(method, handler) for method, handler in handlers.items()}

    def _needed(self, method: str) -> Role | None:
        needed = _NEEDED[method]
        return self._infer_role if needed == INFER else needed if isinstance(needed, Role) else None

    def admit(self, method: str, context: CallContext) -> Refusal | None:
        """Check one call of `method`: its refusal, or None after recording whether a member made it
        (`from_member()`, for the rest of the call's context)."""
        needed = self._needed(method) if self._credentials is not None else None
        member = self._members or self._proven(method, context)
        if not member and needed is not None and (refusal := self._refusal(method, needed, context)) is not None:
            return refusal
        _MEMBER.set(member)
        return None

    def _guarded(self, method: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        async def admit(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            refusal = self.admit(method, context)
            if refusal is not None:
                await context.abort(refusal.code, refusal.message)

        if inspect.isasyncgenfunction(handler):
            @functools.wraps(handler)
            async def streaming(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                await admit(context)
                async for response in handler(requests, context):
                    yield response

            return streaming

        @functools.wraps(handler)
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await admit(context)
            return await handler(request, context)

        return unary

    def _proven(self, method: str, context: CallContext) -> bool:
        if self._proof is None:
            return False
        for key, value in context.invocation_metadata() or ():
            if key == PROOF_KEY:
                return self._proof.verify(method, value if isinstance(value, str) else value.decode())
        return False

    def _refusal(self, method: str, needed: Role, context: CallContext) -> Refusal | None:
        role, presented = self._role(context)
        if role is None:
            why = "the bearer token presented is not valid" if presented else "no credentials were presented"
            return Refusal(grpc.StatusCode.UNAUTHENTICATED,
                           f"{method} needs the {needed.name.lower()} role and {why}: send the metadata "
                           "`authorization: Bearer TOKEN` (meshserve --token-file or MESHSERVE_TOKEN) or a "
                           "client certificate mapped to a role")
        if role < needed:
            return Refusal(grpc.StatusCode.PERMISSION_DENIED,
                           f"{method} needs the {needed.name.lower()} role; these credentials have the "
                           f"{role.name.lower()} role")
        return None

    def _role(self, context: CallContext) -> tuple[Role | None, bool]:
        """The caller's role (None: unknown) and whether it presented a token at all."""
        assert self._credentials is not None
        presented = b""
        for key, value in context.invocation_metadata() or ():
            text = value if isinstance(value, str) else value.decode(errors="replace")
            if key == "authorization" and text[:len(BEARER)].lower() == BEARER:
                presented = text[len(BEARER):].strip().encode()
        if presented:
            found = None
            for token, role in self._credentials.tokens:  # every one compared: the time tells nothing
                if hmac.compare_digest(token, presented):
                    found = role
            return found, True
        identities = self._credentials.identities
        roles = [identities[n.decode(errors="replace")] for n in context.peer_identities() or ()
                 if n.decode(errors="replace") in identities]
        return (max(roles) if roles else None), False
