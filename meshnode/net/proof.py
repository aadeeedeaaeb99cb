"""Proof that a call comes from a mesh member when peers talk without TLS: an HMAC with the mesh secret.

A peer adds `meshserve-proof: TIME.NONCE.MAC` to its calls, MAC = HMAC-SHA256(secret, "TIME.NONCE.METHOD").
The receiver accepts it within WINDOW_S of its own clock, once: a nonce seen before is a replay. Without
TLS this proves who sent the call, not that its body was not altered on the way; peer mTLS proves both.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

PROOF_KEY = "meshserve-proof"
WINDOW_S = 30.0
# Nonces kept against replay: more than a window's worth of forwarded calls at a busy node's rate.
MAX_NONCES = 1_000_000


def read_secret(path: Path) -> bytes:
    secret = path.read_bytes().strip()
    if len(secret) < 16:
        raise ValueError(f"the mesh secret in {path} is shorter than 16 bytes")
    return secret


class MeshProof:
    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time,
                 nonce: Callable[[], str] = lambda: secrets.token_hex(8)) -> None:
        self._secret = secret
        self._now = clock
        self._nonce = nonce
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it may be forgotten

    def _mac(self, stamp: str, nonce: str, method: str) -> str:
        return hmac.digest(self._secret, f"{stamp}.{nonce}.{method}".encode(), "sha256").hex()

    def sign(self, method: str) -> tuple[str, str]:
        """The metadata entry that proves a call to `method` (its bare name, e.g. ModelInfer)."""
        stamp, nonce = f"{self._now():.3f}", self._nonce()
        return PROOF_KEY, f"{stamp}.{nonce}.{self._mac(stamp, nonce, method)}"

    def verify(self, method: str, value: str) -> bool:
        stamp, _, rest = value.partition(".")
        # The stamp itself has a dot: TIME is seconds.milliseconds.
        millis, _, rest = rest.partition(".")
        nonce, _, mac = rest.partition(".")
        stamp = f"{stamp}.{millis}"
        try:
            at = float(stamp)
        except ValueError:
            return False
        now = self._now()
        if abs(now - at) > WINDOW_S or not hmac.compare_digest(mac, self._mac(stamp, nonce, method)):
            return False
        self._forget_old(now)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now + 2 * WINDOW_S
        return True

    def _forget_old(self, now: float) -> None:
        seen = self._seen
        while seen and (len(seen) >= MAX_NONCES or next(iter(seen.values())) <= now):
            seen.popitem(last=False)
