"""The job runner with the copier replaced (tests/unit/test_jobs.py, test_cutover.py): a recorder of hooks and
copies, a first login, one job run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidecar.auth.policy import CredentialCache
from sidecar.migration.copier import CopyResult
from sidecar.migration.jobs import Hooks, JobRunner
from sidecar.states import State
from sidecar.store.base import Store

A = "alice@example.test"


class Recorder:
    def __init__(self) -> None:
        self.released: list[str] = []
        self.kicked: list[str] = []
        self.copies: list[tuple[str, str]] = []
        self.connections: list[int] = []  # the IMAP sessions each copy was allowed (CopyOptions.connections)
        self.fail_with: list[Exception] = []

    def hooks(self) -> Hooks:
        return Hooks(release_held=self.release, after_migrated=self.after)

    def release(self, address: str) -> int:
        self.released.append(address)
        return 2

    def after(self, address: str, logins: list[str]) -> None:
        self.kicked.append(address)

    def copy(
        self, source: Any, home: Path, store: Store, address: str, *, mode: str, progress: Any, options: Any = None
    ) -> CopyResult:
        self.copies.append((address, mode))
        self.connections.append(options.connections if options is not None else 1)
        if self.fail_with:
            raise self.fail_with.pop(0)
        return CopyResult(address, mode)


def first_login(store: Store, creds: CredentialCache | None) -> None:
    store.transition(A, State.COPYING, reason="first login")
    if creds is not None:
        creds.put(A, A, "pw")
    store.enqueue(A, "copy")


def run_one(runner: JobRunner, store: Store) -> None:
    job = store.lease(runner.owner, seconds=60)
    assert job is not None
    runner.run_job(job)
