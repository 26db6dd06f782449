"""A migrated account whose trailing sweep cannot run is shown by `autoport report` and refused by
`autoport finalize --check`, with the reason and the fix (tests/unit/test_jobs.py records it)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from harness.cli import autoport
from harness.records import HASH

from sidecar import config as config_mod
from sidecar.migration.jobs import NO_CREDENTIALS
from sidecar.migration.sweep import changed
from sidecar.ops import finalize
from sidecar.ops.report import build_report
from sidecar.states import State
from sidecar.store.base import FolderMark, Store

A = "alice@example.org"


def migrate(s: Store, address: str) -> None:
    for st in (State.COPYING, State.CUTOVER, State.MIGRATED):
        s.transition(address, st)
    s.set_password_hash(address, HASH)
    s.touch_login(address)


def test_report_and_finalize_name_the_blocked_sweep_and_the_fix(cfg_path: Path, config_store: Store) -> None:
    store = config_store
    cfg = config_mod.load(cfg_path)
    migrate(store, A)
    store.set_inventory("file:/legacy-users", "account", [A])  # the legacy side's list: alice is all there is
    assert build_report(cfg, store).readiness.ready
    assert finalize.check(cfg, store).ready
    store.set_sweep_block(A, NO_CREDENTIALS)
    rep = build_report(cfg, store)
    assert not rep.readiness.ready
    assert [(s.address, s.reason) for s in rep.sweeps] == [(A, NO_CREDENTIALS)]
    assert any("cannot be swept" in r for r in rep.readiness.reasons)
    verdict = finalize.check(cfg, store)
    (reason,) = verdict.reasons
    assert A in reason and "admin_user" in reason and "admin_password" in reason
    assert finalize.check(cfg, store, exclude=frozenset({A})).ready
    store.close()
    p = autoport(cfg_path, "report", "--format", "json")
    assert json.loads(p.stdout)["sweeps"][0]["address"] == A
    p = autoport(cfg_path, "report")
    assert p.returncode == 0 and "cannot run" in p.stdout
    p = autoport(cfg_path, "finalize", "--check")
    assert p.returncode != 0 and "admin_user" in p.stdout + p.stderr


def FolderStatus(uidvalidity: int, uidnext: int, exists: int) -> SimpleNamespace:
    return SimpleNamespace(uidvalidity=uidvalidity, uidnext=uidnext, exists=exists)


def test_the_status_check_decides_whether_a_sweep_fetches() -> None:
    mark = FolderMark("INBOX", uidvalidity=7, last_uid=10, messages=9)
    assert not changed(FolderStatus(7, 11, 9), mark)
    assert changed(FolderStatus(7, 12, 10), mark)  # one new message
    assert changed(FolderStatus(8, 11, 9), mark)  # UIDVALIDITY changed
    assert not changed(FolderStatus(7, 0, 0), mark) and changed(FolderStatus(7, 0, 1), mark)  # no UIDNEXT sent
    assert not changed(FolderStatus(3, 1, 0), None) and changed(FolderStatus(3, 2, 1), None)  # a new folder
