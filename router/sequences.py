"""Which copy holds a sequence: derived by every node from the sequence's id and the model's copies, with no
shared state and no etcd write per request.

Triton keeps a sequence's state (`sequence_id`, `sequence_start`, `sequence_end` in the request's parameters) in
the copy that served its start, so every request of the sequence must reach that copy. The copies are ranked by
rendezvous hashing of the id with each copy's node: the start goes to the first (any node ranks the same), and a
later request tries them in that order; a copy that does not hold the sequence answers SequenceNotHere and the
next is tried. A copy added mid-sequence may rank first and merely says so; when none holds it, its copy is gone
with its state, and the client is told (SequenceLost), never restarted silently elsewhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from router.errors import MeshError, NotHere

SEQUENCE_ID = "sequence_id"
SEQUENCE_START = "sequence_start"
SEQUENCE_END = "sequence_end"


@dataclass(frozen=True, slots=True)
class SequenceFlags:
    id: int | str
    start: bool = False
    end: bool = False

    def __str__(self) -> str:
        return str(self.id)


def sequence_of(parameters: Mapping[str, Any]) -> SequenceFlags | None:
    """The request's sequence from its parameters (a protobuf map of InferParameter), None outside one: as
    Triton, an id of 0 or "" is no sequence."""
    found = parameters.get(SEQUENCE_ID)
    if found is None:
        return None
    which = found.WhichOneof("parameter_choice")
    value = found.string_param if which == "string_param" else found.int64_param if which == "int64_param" else 0
    if not value:
        return None
    start, end = parameters.get(SEQUENCE_START), parameters.get(SEQUENCE_END)
    return SequenceFlags(value, start is not None and start.bool_param, end is not None and end.bool_param)


def rank(sequence: SequenceFlags, nodes: Iterable[str]) -> list[str]:
    """`nodes` in the order a sequence's requests try them: highest rendezvous weight first."""
    key = f"{type(sequence.id).__name__}:{sequence.id}|".encode()
    return sorted(nodes, key=lambda node: hashlib.blake2b(key + node.encode(), digest_size=8).digest(), reverse=True)


class SequenceNotHere(NotHere):
    """This copy does not hold the sequence (never started here, ended, or idle past its limit): try the next."""

    def __init__(self, sequence: SequenceFlags, model: str, node: str) -> None:
        super().__init__(f"sequence {sequence} of model '{model}' is not open on node {node}")


class SequenceLost(MeshError):
    """No copy holds the sequence: Triton's words for a request without START, and what happened to the state."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, sequence: SequenceFlags, model: str) -> None:
        super().__init__(f"inference request for sequence {sequence} to model '{model}' must specify the "
                                 "START flag on the first request of the sequence: no copy of the model holds it (a "
                                 "sequence that was started lost its state with its copy, or was idle past the "
                                 "model's max_sequence_idle_microseconds)")
