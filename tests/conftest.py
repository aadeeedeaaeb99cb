"""Fixtures shared by every test: one throw-away etcd server per session, a fresh key prefix per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from meshnode.local.etcd import EtcdProcess


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdProcess]:
    """Shared by all tests: do not stop it; a test that takes etcd away starts its own EtcdProcess."""
    server = EtcdProcess.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses, so tests sharing the etcd server cannot see each other."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def private_etcd() -> Iterator[EtcdProcess]:
    """An etcd server of the test's own, for tests that stop, restart or wipe it."""
    server = EtcdProcess.start()
    try:
        yield server
    finally:
        server.stop()
