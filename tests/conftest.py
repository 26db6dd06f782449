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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.backends import Backend
from harness.labs import make_lab_dir, running_lab
from harness.milter_wire import SERVER as MILTER_SERVER
from harness.shim import FakePolicy, Server
from harness.socketmap_server import KINDS, STATES, Running, SharedFlagsStore

from sidecar.lab.info import LabInfo
from sidecar.lab.pgcluster import PgCluster
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
def work() -> Iterator[Path]:
    """A fresh, short directory under /tmp for rendered files (no lab in it), removed afterwards."""
    d = make_lab_dir("ap-tgt-")
    try:
        yield d
    finally:
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


# --- servers for unit tests: the checkpassword auth server, the socketmap, the milter (shared by their own tests
# and by test_bad_input)
@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """The auth server on a UNIX socket with harness.shim.FakePolicy, for the real checkpassword shim."""
    s = Server(str(tmp_path / "auth.sock"), FakePolicy())
    yield s
    s.close()


@pytest.fixture(params=KINDS)
def serve(request: pytest.FixtureRequest) -> Iterator[Callable[..., Running]]:
    """serve(**server limits) starts a socketmap server over the fake store holding STATES; all stopped after.
    Once per server: the asyncio one and the worker processes (both must answer alike)."""
    started: list[Running] = []
    tmp = Path(tempfile.mkdtemp(prefix="sm-", dir="/tmp"))

    def start(**kw: Any) -> Running:
        r = Running(tmp, SharedFlagsStore(dict(STATES), tmp / f"flags{len(started)}"), request.param, **kw)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def milter_server() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """run_milter() in a subprocess on a UNIX socket (its path, the process); SIGUSR1 stops it."""
    d = Path(tempfile.mkdtemp(prefix="mt-", dir="/tmp"))
    path = str(d / "milter.sock")
    proc = subprocess.Popen(
        [sys.executable, "-c", MILTER_SERVER, f"unix:{path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield path, proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
    shutil.rmtree(d, ignore_errors=True)


# --- the store on both backends (tests/unit/test_store*.py) ------------------------------------------------


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    with PgCluster() as pg:
        yield pg


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        b = Backend("sqlite", f"sqlite://{tmp_path}/store/state.db")
        yield b
        b.close()
        return
    pg: PgCluster = request.getfixturevalue("pg_cluster")
    name = "t_" + request.node.name.rsplit("[", 1)[0][5:40].lower() + "_" + os.urandom(3).hex()
    b = Backend("postgres", pg.create_schema(name))
    yield b
    b.close()
    pg.drop_schema(name)


# --- a config file and its store, for the CLI and report tests ------------------------------------------------


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    from harness.cli import write_config

    return write_config(tmp_path)


@pytest.fixture
def config_store(cfg_path: Path) -> Iterator[Store]:
    from sidecar import config as config_mod
    from sidecar.store import open_store

    s = open_store(config_mod.load(cfg_path).store.url)
    s.init()
    yield s
    s.close()
