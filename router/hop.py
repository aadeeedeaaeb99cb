"""What a forwarded request carries in gRPC metadata: its hop count, the nodes tried, its mode."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

# The hop travels in the request's own `parameters` map: parsed with the request anyway, where gRPC
# metadata entries cost tens of microseconds on each side of every forwarded call.
PARAMETER_KEY = "meshserve_hop"
HOPS_KEY = "meshserve-hops"
TRIED_KEY = "meshserve-tried"
MODE_KEY = "meshserve-mode"
# The hop's own metadata entries: honoured from mesh members only (a client's are stripped).
HOP_METADATA = frozenset((HOPS_KEY, TRIED_KEY, MODE_KEY))
# Trace context travels unchanged from the client through every hop.
PROPAGATED_KEYS = ("traceparent", "tracestate")
MAX_HOPS = 2


class Mode(Enum):
    ANY = "any"  # a client request: route it anywhere
    COPY = "copy"  # sent to a node believed to hold a copy: serve it or answer NotHere
    LOAD = "load"  # sent to the node placement chose: load it there unless that flushes its hot set
    LOAD_LAST = "load-last"  # no other node can take it: load it there even evicting recent models


def trace_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[tuple[str, str], ...]:
    """The caller's W3C trace context entries, to pass on to whatever this hop calls next."""
    return tuple((key, value.decode(errors="replace") if isinstance(value, bytes) else value)
                 for key, value in metadata or () if key in PROPAGATED_KEYS)


@dataclass(frozen=True, slots=True)
class Hop:
    hops: int = 0
    tried: tuple[str, ...] = ()
    mode: Mode = Mode.ANY
    propagated: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]] | None) -> Hop:
        hops, mode = 0, Mode.ANY
        tried: tuple[str, ...] = ()
        propagated: list[tuple[str, str]] = []
        for key, value in metadata or ():
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            # isascii: str.isdigit() also accepts digits such as '²' that int() rejects.
            if key == HOPS_KEY and text.isascii() and text.isdigit() and len(text) <= 3:
                hops = int(text)
            elif key == TRIED_KEY:
                tried = tuple(t for t in text.split(",") if t)
            elif key == MODE_KEY:
                mode = next((m for m in Mode if m.value == text), Mode.ANY)
            elif key in PROPAGATED_KEYS:
                propagated.append((key, text))
        return cls(hops, tried, mode, tuple(propagated))

    def encode(self) -> str:
        """The parameter value: 'HOPS|MODE|TRIED,TRIED'."""
        return f"{self.hops}|{self.mode.value}|{','.join(self.tried)}"

    @classmethod
    def decode(cls, text: str, propagated: tuple[tuple[str, str], ...] = ()) -> Hop:
        """The inverse of encode; anything malformed reads as a fresh client request."""
        hops, _, rest = text.partition("|")
        mode_text, _, tried = rest.partition("|")
        if not (hops.isascii() and hops.isdigit() and len(hops) <= 3):
            return cls(propagated=propagated)
        mode = next((m for m in Mode if m.value == mode_text), Mode.ANY)
        return cls(int(hops), tuple(t for t in tried.split(",") if t), mode, propagated)

    def forward(self, mode: Mode, tried: Iterable[str]) -> Hop:
        return Hop(self.hops + 1, tuple(tried), mode, self.propagated)

    def to_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((HOPS_KEY, str(self.hops)), (TRIED_KEY, ",".join(self.tried)), (MODE_KEY, self.mode.value),
                *self.propagated)
