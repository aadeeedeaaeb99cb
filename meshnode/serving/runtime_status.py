"""Whether this node's runtime answers: while it does not, the local replica takes no loads and the
request goes elsewhere (meshnode.mesh.runtime_health watches the runtime and keeps this current)."""

from __future__ import annotations


class RuntimeStatus:
    def __init__(self) -> None:
        self.down_reason: str | None = None  # why the runtime cannot serve now; None while it can

    @property
    def up(self) -> bool:
        return self.down_reason is None
