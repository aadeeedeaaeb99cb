"""What the sequence tests share: one step of a sequence as tritonclient sends it, and ids by their holder."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient

from router.sequences import SequenceFlags, rank


def sequence_step(client: grpcclient.InferenceServerClient, model: str, sequence_id: int, value: int, *,
         start: bool = False, end: bool = False) -> grpcclient.InferResult:
    """One request of the sequence: INPUT INT32 [1, 1] holding `value`."""
    tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], np.int32))
    return client.infer(model, [tensor], sequence_id=sequence_id, sequence_start=start, sequence_end=end,
                        client_timeout=30)


def ids_held_by(holder: str, count: int) -> list[int]:
    """Sequence ids whose first copy in the mesh's order (copies on n0 and n1) is `holder`'s."""
    return [i for i in range(1, 1000) if rank(SequenceFlags(i, start=True), ["n0", "n1"])[0] == holder][:count]
