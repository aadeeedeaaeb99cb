"""Fixtures shared by every test: one throw-away etcd server per session, a fresh key prefix per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnode.local.etcd import EtcdProcess

TESTS = Path(__file__).parent
KINDS = ("unit", "integration", "deploy")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks each test by its directory, so `-m unit` / `-m integration` need no marker in the test files."""
    for item in items:
        for kind in KINDS:
            if item.path.is_relative_to(TESTS / kind):
                item.add_marker(kind)


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
