"""MeshProof: an HMAC over time, nonce and method, accepted once within the window."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from meshnode.net.proof import PROOF_KEY, WINDOW_S, MeshProof, read_secret

SECRET = b"0123456789abcdef-mesh"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def proof(clock: Clock, secret: bytes = SECRET) -> MeshProof:
    counter = itertools.count()
    return MeshProof(secret, clock, nonce=lambda: f"n{next(counter)}")


def test_a_signed_call_is_accepted_once() -> None:
    clock = Clock()
    key, value = proof(clock).sign("ModelInfer")
    receiver = proof(clock)
    assert key == PROOF_KEY
    assert receiver.verify("ModelInfer", value)
    assert not receiver.verify("ModelInfer", value)  # a replay


@pytest.mark.parametrize("case", ["other method", "other secret", "too old", "from the future", "garbage"])
def test_anything_else_is_refused(case: str) -> None:
    clock = Clock()
    signer = proof(clock, b"another-secret-of-16+" if case == "other secret" else SECRET)
    _, value = signer.sign("ModelInfer")
    clock.now += {"too old": WINDOW_S + 1, "from the future": -WINDOW_S - 1}.get(case, 0)
    if case == "garbage":
        value = "x.y.z"
    method = "RepositoryModelLoad" if case == "other method" else "ModelInfer"
    assert not proof(clock).verify(method, value)


def test_nonces_are_forgotten_after_the_window() -> None:
    clock = Clock()
    receiver = proof(clock)
    assert receiver.verify("ServerReady", proof(clock).sign("ServerReady")[1])
    clock.now += 3 * WINDOW_S
    assert receiver.verify("ServerReady", proof(clock).sign("ServerReady")[1])
    assert len(receiver._seen) == 1


def test_a_short_secret_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("short\n")
    with pytest.raises(ValueError, match="shorter than 16 bytes"):
        read_secret(tmp_path / "s")
    (tmp_path / "s").write_text("a-long-enough-secret\n")
    assert read_secret(tmp_path / "s") == b"a-long-enough-secret"
