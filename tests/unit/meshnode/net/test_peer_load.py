"""PeerLoad: the calls outstanding per peer (a peer leaves the map at zero, never below) and the suspects (for
SUSPECT_S of an injected clock), changed from many threads at once."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from meshnode.net.peer_load import SUSPECT_S, PeerLoad
from tests.unit.meshnode.fakes import WAIT_S

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def switching_often() -> Iterator[None]:
    """Threads switch every microsecond: at the default 5 ms, 8 threads without the lock lose no update."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_calls_are_counted_per_peer_and_a_peer_leaves_the_map_at_zero() -> None:
    load = PeerLoad()
    seen = load.outstanding()
    load.started("n1")
    load.started("n1")
    load.started("n2")
    assert seen == {"n1": 2, "n2": 1}  # the live map: the router reads it without a copy

    assert load.ended("n1") == 1
    assert load.outstanding() == {"n1": 1, "n2": 1}
    assert (load.ended("n1"), load.ended("n2")) == (0, 0)
    assert load.outstanding() == {}


def test_a_call_that_ends_after_its_peer_was_dropped_never_goes_below_zero() -> None:
    load = PeerLoad()
    assert load.ended("gone") == 0
    assert load.outstanding() == {}
    load.started("gone")
    assert load.outstanding() == {"gone": 1}  # counted from zero again, not from -1


def test_a_suspect_stays_one_for_suspect_s_of_the_clock() -> None:
    clock = Clock()
    load = PeerLoad(clock)
    assert load.suspects() == frozenset()
    load.suspect("n1")
    clock.now += 1.0
    load.suspect("n2")
    clock.now += SUSPECT_S - 1.0 - 0.01
    assert load.suspects() == {"n1", "n2"}
    clock.now += 0.01
    assert load.suspects() == {"n2"}  # n1's time is up
    clock.now += 1.0
    assert load.suspects() == frozenset()


def test_suspecting_again_extends_and_clear_ends_it_at_once() -> None:
    clock = Clock()
    load = PeerLoad(clock)
    load.suspect("n1")
    load.suspect("n2")
    clock.now += SUSPECT_S - 0.5
    load.suspect("n1")
    clock.now += 1.0
    assert load.suspects() == {"n1"}
    load.clear("n1")
    load.clear("never-suspected")
    assert load.suspects() == frozenset()


@pytest.mark.usefixtures("switching_often")
def test_threads_starting_and_ending_calls_at_once_leave_an_empty_map() -> None:
    load = PeerLoad()
    threads_n, calls_n, peers = 8, 5_000, ("n1", "n2", "n3")
    together = threading.Barrier(threads_n, timeout=WAIT_S)
    below_zero: list[int] = []

    def hammer(index: int) -> None:
        together.wait()
        for i in range(calls_n):
            peer = peers[(index + i) % len(peers)]
            load.started(peer)
            load.started(peer)
            if (left := load.ended(peer)) < 1:  # this thread still holds one call to it
                below_zero.append(left)
            load.ended(peer)

    threads = [threading.Thread(target=hammer, args=(index,)) for index in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20.0)
    assert not any(thread.is_alive() for thread in threads)
    assert below_zero == []
    assert load.outstanding() == {}
