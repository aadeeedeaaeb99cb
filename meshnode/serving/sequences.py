"""The sequences open on this node's copies (router.sequences says which copy a sequence's requests reach).

Only a model whose config declares sequence batching keeps sequences (as in Triton, a model without ignores the
flags). A start opens the sequence on the copy that serves it, each request renews it, an end closes it, and one idle
past the model's `max_sequence_idle_microseconds` (Triton's default, 1 s, when its config has none) is over as
Triton's sequence batcher would release it. A request of a sequence not open here is SequenceNotHere: its sender
tries the next copy in the sequence's order. While a copy has sequences open it is not evicted
(`CachedModel.sequences_until`): evicting it would lose their state.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from meshnode.serving.entries import CachedModel
from meshpb import pb
from router.sequences import SequenceFlags, SequenceNotHere, sequence_of

DEFAULT_IDLE_S = 1.0  # Triton's max_sequence_idle_microseconds when a model's config does not set it

# A copy's max_sequence_idle_microseconds in seconds; 0 for a model without sequence batching, whose requests
# Triton serves whatever their sequence flags say.
IdleLimit = Callable[[CachedModel], float]


class Sequences:
    def __init__(self, instance_id: str, idle_limit: IdleLimit,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._instance_id = instance_id
        self._idle_limit = idle_limit
        self._now = wall_clock  # the cache's clock: it compares `sequences_until` with it
        self._open: dict[str, dict[int | str, float]] = {}  # copy's key -> sequence id -> idle until

    def admit(self, entry: CachedModel, request: pb.ModelInferRequest) -> None:
        """Before `request` runs on `entry`: open, renew or close its sequence, or SequenceNotHere."""
        parameters = request.parameters
        if not parameters:  # the common case, decided without a lookup
            return
        sequence = sequence_of(parameters)
        if sequence is None:
            return
        limit = entry.sequence_idle_s
        if limit is None:
            limit = entry.sequence_idle_s = self._idle_limit(entry)  # once per copy
        if limit:
            self._admit(entry, sequence, limit)

    def _admit(self, entry: CachedModel, sequence: SequenceFlags, limit: float) -> None:
        now = self._now()
        open_here = self._open.setdefault(entry.key, {})
        until = open_here.get(sequence.id)
        for idle in [s for s, u in open_here.items() if u <= now]:
            del open_here[idle]
        if not sequence.start and (until is None or until <= now):
            open_here.pop(sequence.id, None)
            raise SequenceNotHere(sequence, entry.name, self._instance_id)
        if sequence.end:
            open_here.pop(sequence.id, None)
        else:
            open_here[sequence.id] = now + limit
        entry.sequences_until = max(open_here.values(), default=0.0)
        if not open_here:
            del self._open[entry.key]

    def open_count(self) -> int:
        """Sequences open on this node's copies now (idle ones included until a request finds them over)."""
        return sum(len(ids) for ids in self._open.values())
