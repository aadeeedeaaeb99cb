"""Sequences open on this node's copies: opened by a start, renewed, closed by an end or idleness; a copy with
one open is not evicted."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshnode.serving.entries import CachedModel
from meshnode.serving.sequences import DEFAULT_IDLE_S, Sequences
from meshpb import pb
from router.sequences import SequenceNotHere
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import NOW, SIZE, ManualClock, NodeParts
from tests.unit.meshnode.serving.test_cache import Kit

pytestmark = pytest.mark.timeout(10)
IDLE_S = 5.0


def request(sequence_id: int | str, *, start: bool = False, end: bool = False) -> pb.ModelInferRequest:
    value = pb.InferParameter(string_param=sequence_id) if isinstance(sequence_id, str) else pb.InferParameter(
        int64_param=sequence_id)
    return pb.ModelInferRequest(model_name="m", parameters={
        "sequence_id": value, "sequence_start": pb.InferParameter(bool_param=start),
        "sequence_end": pb.InferParameter(bool_param=end)})


def entry(key: str = "m@1") -> CachedModel:
    return CachedModel(key, key.split("@")[0], key.split("@")[1], SIZE, NOW, NOW)


def table(clock: ManualClock, limits: list[str] | None = None) -> Sequences:
    def idle_limit(copy: CachedModel) -> float:
        if limits is not None:
            limits.append(copy.key)
        return IDLE_S

    return Sequences("me", idle_limit, clock)


def test_a_start_opens_a_sequence_its_requests_renew_and_its_end_closes() -> None:
    clock, asked = ManualClock(), []
    sequences, copy = table(clock, asked), entry()
    sequences.admit(copy, request(7, start=True))
    assert copy.sequences_until == NOW + IDLE_S and sequences.open_count() == 1
    clock.advance(4)
    sequences.admit(copy, request(7))
    assert copy.sequences_until == NOW + 4 + IDLE_S
    sequences.admit(copy, request("s", start=True))  # string ids too, side by side
    sequences.admit(copy, request(7, end=True))
    assert sequences.open_count() == 1 and copy.sequences_until == NOW + 4 + IDLE_S  # 's' still holds the copy
    sequences.admit(copy, request("s", end=True))
    assert sequences.open_count() == 0 and copy.sequences_until == 0.0
    assert asked == ["m@1"]  # the model's limit is read once per copy


def test_a_request_of_a_sequence_not_open_here_or_idle_past_its_limit_is_not_here() -> None:
    clock = ManualClock()
    sequences, copy = table(clock), entry()
    with pytest.raises(SequenceNotHere, match="^not here: sequence 3 of model 'm' is not open on node me$"):
        sequences.admit(copy, request(3))
    sequences.admit(copy, request(3, start=True))
    clock.advance(IDLE_S + 0.1)
    with pytest.raises(SequenceNotHere):
        sequences.admit(copy, request(3))
    with pytest.raises(SequenceNotHere):  # its end too: the state is gone
        sequences.admit(copy, request(3, end=True))


def test_a_model_without_sequence_batching_serves_sequence_flags_as_triton_does() -> None:
    sequences, copy = Sequences("me", lambda _: 0.0, ManualClock()), entry()
    sequences.admit(copy, request(3))  # no start, and no error: the model keeps no sequences
    sequences.admit(copy, request(4, start=True))
    assert sequences.open_count() == 0 and copy.sequences_until == 0.0


def test_requests_outside_a_sequence_pass_untouched() -> None:
    sequences, copy = table(ManualClock()), entry()
    sequences.admit(copy, pb.ModelInferRequest(model_name="m"))
    sequences.admit(copy, request(0))  # id 0 is no sequence, as in Triton
    assert sequences.open_count() == 0 and copy.sequences_until == 0.0
    assert DEFAULT_IDLE_S == 1.0  # Triton's max_sequence_idle_microseconds default


async def test_a_copy_with_a_sequence_open_is_not_evicted_until_it_is_idle() -> None:
    kit = Kit(capacity=2 * SIZE)
    await kit.use("a")
    await kit.use("b")
    a = kit.cache.ready[("a", "")]
    a.sequences_until = kit.clock() + IDLE_S
    await kit.use("c")
    assert kit.held() == ["a@1", "c@1"]  # b went, though a was the least recently used
    kit.clock.advance(IDLE_S)
    await kit.use("d")
    assert kit.held() == ["c@1", "d@1"]


async def test_the_replica_reads_the_idle_limit_from_the_models_config(tmp_path: Path) -> None:
    node = await NodeParts(FakeStore(), tmp_path / "repo").start(mesh=False)
    try:
        for name, config, expected in (("seq", "sequence_batching { max_sequence_idle_microseconds: 2500000 }", 2.5),
                                       ("dflt", "sequence_batching { }", DEFAULT_IDLE_S), ("plain", "", 0.0)):
            record = await node.register(name)
            (Path(record.storage) / "config.pbtxt").write_text(config)
            copy = await node.replica.acquire(name, "")
            node.replica.sequences.admit(copy, request(1, start=True))
            node.cache.release(copy)
            assert copy.sequence_idle_s == expected
            assert copy.sequences_until == (node.clock() + expected if expected else 0.0)
    finally:
        await node.stop()
