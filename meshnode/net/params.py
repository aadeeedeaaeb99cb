"""meshserve's repository parameters beyond Triton's `config` and `file:*` (Triton ignores unknown ones).

They are wire names: peers send them, the repository servicer reads them, clients' scripts set them.
"""

LAZY = "meshserve.lazy"  # register without loading now
UNREGISTER = "meshserve.unregister"  # with unload: forget the model entirely
SIZE_HINT = "meshserve.size_hint"
COPY = "meshserve.copy"  # from a peer: load a copy of a registered model here, nothing else
