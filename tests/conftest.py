"""The one conftest: markers by folder and the shared lab fixtures.

tests/unit  pure logic, codecs, fakes; no server started (PostgreSQL-backed cases carry the postgres marker).
tests/e2e   real Postfix, Dovecot, legacy servers and the sidecar on loopback: every test gets the e2e marker.
The harness (tests/harness) holds what both use: labs, mail clients, waiting on conditions.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.labs import make_lab_dir

_E2E_DIR = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e starts servers, and so does every PostgreSQL-backed case: mark both e2e."""
    for item in items:
        if _E2E_DIR in Path(item.path).parents or item.get_closest_marker("postgres"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def lab() -> Iterator[dict[str, Any]]:
    """One lab for the session: legacy (dovecot profile, 8 users), target stack, sidecar, SQLite store."""
    from sidecar.lab import launcher

    d = make_lab_dir()
    info = launcher.lab_up(d, users=8)
    try:
        yield info
    finally:
        launcher.lab_down(d)
        if not os.environ.get("AUTOPORT_KEEP_LABS"):
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def lab_dir() -> Iterator[Path]:
    """An empty lab directory for a test that starts its own lab."""
    d = make_lab_dir()
    yield d
    from sidecar.lab import launcher

    launcher.lab_down(d)
    if not os.environ.get("AUTOPORT_KEEP_LABS"):
        shutil.rmtree(d, ignore_errors=True)
