"""The one conftest: markers by folder and the shared lab fixtures.

tests/unit  pure logic, codecs, fakes; no server started (PostgreSQL-backed cases carry the postgres marker).
tests/e2e   real Postfix, Dovecot, legacy servers and the sidecar on loopback: every test gets the e2e marker.
The harness (tests/harness) holds what both use: labs, mail clients, waiting on conditions, the fake store,
the CLI runner. Fixtures shared across modules live here and nowhere else: `lab` (one per module that sets LAB,
else one for the session), `store` (that lab's store), `lab_dir` (an empty directory for a lab of one's own).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.labs import make_lab_dir, running_lab

from sidecar.lab.info import LabInfo
from sidecar.store import open_store
from sidecar.store.base import Store

_E2E_DIR = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e starts servers, and so does every PostgreSQL-backed case: mark both e2e."""
    for item in items:
        if _E2E_DIR in Path(item.path).parents or item.get_closest_marker("postgres"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def session_lab() -> Iterator[LabInfo]:
    """The lab of modules that set no LAB: legacy (dovecot profile, 8 users), target stack, sidecar, SQLite store."""
    with running_lab(users=8) as info:
        yield info


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[LabInfo]:
    """The one lab fixture. A module that needs its own lab sets LAB = {"prefix": ..., **launcher.lab_up keywords};
    the others share session_lab."""
    options: dict[str, Any] | None = getattr(request.module, "LAB", None)
    if options is None:
        yield request.getfixturevalue("session_lab")
        return
    with running_lab(**options) as info:
        yield info


@pytest.fixture(scope="module")
def store(lab: LabInfo) -> Iterator[Store]:
    """The lab's state store, opened from the test process (a module may override it, e.g. to seed states)."""
    s = open_store(lab["store"])
    yield s
    s.close()


@pytest.fixture
def lab_dir() -> Iterator[Path]:
    """An empty lab directory for a test that starts its own lab."""
    d = make_lab_dir()
    yield d
    from sidecar.lab import launcher

    launcher.lab_down(d)
    if not os.environ.get("AUTOPORT_KEEP_LABS"):
        shutil.rmtree(d, ignore_errors=True)
