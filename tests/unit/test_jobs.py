"""The job runner's path for an account, on a real SQLite store with the copier replaced (pure logic).

The copier itself is proven against real servers in test_copier_*.py; the whole path with real servers is in
test_migration_e2e.py. Here: which transitions happen, when mail is released, what happens without
credentials, with failures, and after a crash.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.jobs import A, Recorder, first_login, run_one
from harness.waiting import wait_for

from sidecar import config
from sidecar.auth.policy import CredentialCache
from sidecar.migration.copier import CopyResult, SourceAuthError, SourceBusy, SourceUnavailable
from sidecar.migration.jobs import BUSY_RETRY, CREDENTIAL_WAIT, Hooks, JobRunner, Slots, backoff
from sidecar.states import State
from sidecar.store import open_store
from sidecar.store.base import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    s.init()
    yield s
    s.close()


def make_runner(store: Store, tmp_path: Path, rec: Recorder, creds: CredentialCache, **limits: Any) -> JobRunner:
    cfg = config.from_dict(
        {
            "target": {"mail_root": str(tmp_path / "mail")},
            "limits": {"cutover_grace": 0.0, "copy_attempts": 3, **limits},
        }
    )
    return JobRunner(cfg, store, creds, owner="test", hooks=rec.hooks(), copy=rec.copy)




def test_happy_path_copies_holds_then_releases(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds)
    first_login(store, creds)
    run_one(runner, store)
    account = store.get(A)
    assert account is not None and account.state is State.MIGRATED
    assert rec.copies == [(A, "initial"), (A, "delta")]
    assert rec.released == [A] and rec.kicked == [A]
    assert [j.status for j in store.jobs(A) if j.kind == "copy"] == ["done"]
    kinds = [e.detail for e in store.events(A) if e.kind == "transition"]
    assert kinds == ["cutover -> migrated: final delta done", "copying -> cutover: initial copy done",
                     "(none) -> copying: first login"]


def test_copy_connections_reach_the_copier(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds, copy_connections=3)
    first_login(store, creds)
    run_one(runner, store)
    assert rec.copies == [(A, "initial"), (A, "delta")] and rec.connections == [3, 3]


def test_without_credentials_the_job_waits_for_the_next_login(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds)
    first_login(store, None)
    run_one(runner, store)
    account = store.get(A)
    assert account is not None and account.state is State.COPYING  # the user keeps working on legacy
    (job,) = store.jobs(A)
    assert job.kind == "copy" and job.status == "queued" and job.not_before > time.time() + CREDENTIAL_WAIT - 10
    assert store.lease("test") is None  # not runnable yet
    # the next login brings credentials and wakes the job
    creds.put(A, A, "pw")
    assert store.wake(A, "copy")
    run_one(runner, store)
    account = store.get(A)
    assert account is not None and account.state is State.MIGRATED


def test_temporary_failures_retry_with_backoff_then_fail_toward_legacy(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds)
    first_login(store, creds)
    rec.fail_with = [SourceUnavailable("legacy down")] * 3
    for attempt in (1, 2):
        run_one(runner, store)
        account = store.get(A)
        assert account is not None and account.state is State.COPYING and account.attempts == attempt
        (job,) = [j for j in store.jobs(A) if j.status == "queued"]
        assert job.not_before == pytest.approx(time.time() + backoff(attempt), abs=5)
        store.wake(A)
    run_one(runner, store)
    account = store.get(A)
    assert account is not None and account.state is State.FAILED
    assert "legacy down" in account.last_error
    assert rec.released == []  # nothing was held in copying


def test_failure_during_cutover_releases_held_mail_back_to_legacy(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds, copy_attempts=1)
    first_login(store, creds)

    def copy(source: Any, home: Path, st: Store, address: str, *, mode: str, progress: Any) -> CopyResult:
        rec.copies.append((address, mode))
        if mode == "delta":
            raise SourceUnavailable("connection cut")
        return CopyResult(address, mode)

    runner._copy = copy
    run_one(runner, store)
    account = store.get(A)
    assert account is not None and account.state is State.FAILED
    assert rec.released == [A]  # held mail goes back to the legacy relay


def test_wrong_credentials_drop_the_password_and_wait(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds)
    first_login(store, creds)
    rec.fail_with = [SourceAuthError("NO [AUTHENTICATIONFAILED]")]
    run_one(runner, store)
    assert creds.get(A) is None
    account = store.get(A)
    assert account is not None and account.state is State.COPYING and account.attempts == 0


def test_resume_in_cutover_after_a_crash(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds)
    first_login(store, creds)
    store.transition(A, State.CUTOVER)  # the crashed node got this far
    run_one(runner, store)
    assert rec.copies == [(A, "delta")]
    account = store.get(A)
    assert account is not None and account.state is State.MIGRATED and rec.released == [A]


def test_cutover_with_credentials_lost_fails_toward_legacy(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds)
    first_login(store, None)
    store.transition(A, State.CUTOVER)
    run_one(runner, store)
    account = store.get(A)
    assert account is not None and account.state is State.FAILED  # never hold mail indefinitely
    assert rec.released == [A] and rec.copies == []


def test_expired_lease_is_taken_over_by_another_node(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    first_login(store, creds)
    dead = store.lease("node-a", seconds=0.2)
    assert dead is not None
    assert store.lease("node-b", seconds=60) is None  # still leased
    time.sleep(0.3)
    runner = make_runner(store, tmp_path, rec, creds)
    runner.owner = "node-b"
    run_one(runner, store)
    account = store.get(A)
    assert account is not None and account.state is State.MIGRATED


def test_the_running_loop_picks_up_work_when_poked(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds)
    runner.start()
    try:
        first_login(store, creds)
        runner.poke()
        wait_for(lambda: (a := store.get(A)) is not None and a.state is State.MIGRATED, 10, f"{A} to migrate")
    finally:
        runner.stop()
    assert not [t for t in threading.enumerate() if t.name == "jobs" and t.is_alive()]


def test_backoff_grows_and_is_capped() -> None:
    assert [backoff(n) for n in (1, 2, 3)] == [30.0, 60.0, 120.0]
    assert backoff(50) == 3600.0


def test_trailing_sweeps_after_migration_record_hits(store: Store, tmp_path: Path) -> None:
    from sidecar.migration.copier.engine import FolderResult

    rec, creds = Recorder(), CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds, sweep_interval=60.0, sweep_window=3600.0)
    first_login(store, creds)
    run_one(runner, store)
    (sweep,) = [j for j in store.jobs(A) if j.kind == "sweep"]
    assert sweep.status == "queued" and sweep.not_before == pytest.approx(time.time() + 60, abs=5)
    assert store.lease("test", kinds=("copy", "sweep")) is None  # not due yet

    def append(source: Any, home: Path, st: Store, address: str, *, mode: str, progress: Any) -> CopyResult:
        assert mode == "append"
        return CopyResult(address, mode, folders=[FolderResult("INBOX", "INBOX", copied=2)])

    runner._copy = append
    store.wake(A, "sweep")
    job = store.lease("test", kinds=("copy", "sweep"))
    assert job is not None and job.kind == "sweep"
    runner.run_job(job)
    hits = [e for e in store.events(A) if e.kind == "sweep-hit"]
    assert len(hits) == 1 and "2 message(s)" in hits[0].detail
    queued = [j for j in store.jobs(A) if j.kind == "sweep" and j.status == "queued"]
    assert len(queued) == 1  # the next sweep


def test_a_sweep_without_credentials_never_stops_silently(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds, sweep_interval=0.0)
    first_login(store, creds)
    run_one(runner, store)
    creds.pop(A)  # the password expired from memory; no admin credentials configured
    for _ in range(2):
        job = store.lease("test", kinds=("sweep",))
        assert job is not None
        runner.run_job(job)
    (block,) = store.sweep_blocks()
    assert block.address == A and "admin_user" in block.reason
    assert len([e for e in store.events(A) if e.kind == "sweep-blocked"]) == 1  # once, not every round
    assert [j.status for j in store.jobs(A) if j.kind == "sweep"] == ["queued"]  # looked at again later
    # the password (or admin credentials) is back: the sweep runs and the block is lifted
    creds.put(A, A, "pw")
    job = store.lease("test", kinds=("sweep",))
    assert job is not None
    runner.run_job(job)
    assert store.sweep_blocks() == []


def test_a_sweep_the_legacy_server_refuses_is_recorded(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds, sweep_interval=0.0)
    first_login(store, creds)
    run_one(runner, store)
    rec.fail_with = [SourceAuthError("legacy IMAP login refused")]
    job = store.lease("test", kinds=("sweep",))
    assert job is not None
    runner.run_job(job)
    (block,) = store.sweep_blocks()
    assert "refused" in block.reason and creds.get(A) is None


def test_a_sweep_with_nothing_new_fetches_nothing(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    changed: list[str] = []
    cfg = config.from_dict({"target": {"mail_root": str(tmp_path / "mail")},
                            "limits": {"cutover_grace": 0.0, "sweep_interval": 0.0}})  # fmt: skip
    runner = JobRunner(cfg, store, creds, owner="test", hooks=rec.hooks(), copy=rec.copy,
                       sweep_check=lambda source, st, address: list(changed))  # fmt: skip
    first_login(store, creds)
    run_one(runner, store)
    for folders in ([], ["INBOX"]):
        changed[:] = folders
        job = store.lease("test", kinds=("sweep",))
        assert job is not None
        runner.run_job(job)
    assert rec.copies == [(A, "initial"), (A, "delta"), (A, "append")]  # only when STATUS showed new mail


def test_job_resumed_after_the_switch_releases_mail_and_schedules_sweeps(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds)
    first_login(store, creds)
    job = store.lease("dead-node", seconds=0.1)
    assert job is not None
    store.transition(A, State.CUTOVER)
    store.transition(A, State.MIGRATED)  # the node died right after the switch, before releasing held mail
    time.sleep(0.2)
    run_one(runner, store)
    assert rec.released == [A] and rec.kicked == [A] and rec.copies == []
    assert [j.status for j in store.jobs(A) if j.kind == "copy"] == ["done"]
    assert [j.status for j in store.jobs(A) if j.kind == "sweep"] == ["queued"]


def test_any_exception_counts_an_attempt_and_ends_failed_without_logging_the_password(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14: a copy that raised UnicodeEncodeError (imaplib and a non-ASCII password) retried forever,
    never counted an attempt, and its logged traceback named password characters."""
    rec = Recorder()
    creds = CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds)
    first_login(store, creds)
    secret = "pässwörd-\u20ac"
    for _ in range(3):
        rec.fail_with.append(UnicodeEncodeError("ascii", secret, 1, 2, "ordinal not in range(128)"))
    with caplog.at_level("DEBUG"):
        for _ in range(3):
            job = store.lease(runner.owner, seconds=60)
            assert job is not None
            runner._run_guarded(job)
            with store._write() as cur:  # type: ignore[attr-defined]  # due now (skip the backoff)
                cur.execute("UPDATE jobs SET not_before = 0 WHERE status = 'queued'")
    account = store.get(A)
    assert account is not None and account.state is State.FAILED and account.attempts == 3
    assert "UnicodeEncodeError" in account.last_error and secret not in account.last_error
    assert "pässw" not in caplog.text and "\\xe4" not in caplog.text and "ä" not in caplog.text


def test_admin_copy_uses_the_legacy_login_of_the_mapping(store: Store, tmp_path: Path) -> None:
    from sidecar.store.base import ImportedUser

    rec = Recorder()
    cfg = config.from_dict(
        {
            "target": {"mail_root": str(tmp_path / "mail")},
            "legacy": {"admin_user": "admin", "admin_password": "admin-pw", "login_template": "%n"},
        }
    )
    runner = JobRunner(cfg, store, CredentialCache(), owner="test", hooks=rec.hooks(), copy=rec.copy)
    store.record_login(A, "some-typed-spelling")
    assert runner._source(A).user == "alice"
    store.import_users([ImportedUser("asmith", A)])
    assert runner._source(A).user == "asmith"


# --- copy slots: waiting does not hold one (issue 17) -------------------------------------------------------


def _logins(store: Store, creds: CredentialCache, addresses: list[str]) -> None:
    for address in addresses:
        store.transition(address, State.COPYING, reason="first login")
        creds.put(address, address, "pw")
        store.enqueue(address, "copy")


def test_an_account_in_its_cutover_wait_leaves_the_only_copy_slot_to_the_next(store: Store, tmp_path: Path) -> None:
    """copy_concurrency = 1: while A waits in cutover (grace, route caches), B's initial copy runs; A's final delta
    then takes the slot back. Holding the slot, B would copy only after A's delta."""
    rec, creds = Recorder(), CredentialCache()
    B = "bob@example.test"
    b_copied = threading.Event()
    copy = rec.copy

    def copy_b_noted(*args: Any, mode: str, **kw: Any) -> CopyResult:
        result = copy(*args, mode=mode, **kw)
        if args[3] == B:
            b_copied.set()
        return result

    def quiesce(address: str, logins: list[str]) -> None:
        if address == A:  # A's wait lasts until B copied (or 5 s: then B could not start meanwhile)
            b_copied.wait(5)

    runner = JobRunner(make_runner(store, tmp_path, rec, creds, copy_concurrency=1).cfg, store, creds, owner="test",
                       hooks=Hooks(release_held=rec.release, after_migrated=rec.after, quiesce=quiesce),
                       copy=copy_b_noted)  # fmt: skip
    _logins(store, creds, [A])
    runner.start()
    try:
        wait_for(lambda: store.state_of(A) is State.CUTOVER, 10, f"{A} in cutover")
        _logins(store, creds, [B])
        runner.poke()
        for who in (A, B):
            wait_for(lambda w=who: store.state_of(w) is State.MIGRATED, 15, f"{who} to migrate")  # type: ignore[misc]
    finally:
        runner.stop()
    assert rec.copies.index((B, "initial")) < rec.copies.index((A, "delta")), rec.copies
    assert runner.slots.in_use() == 0


def test_copies_stay_within_the_slots_while_more_accounts_wait_in_cutover(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    lock = threading.Lock()
    copying, waiting = [0], [0]
    peaks = {"copying": 0, "waiting": 0}

    def copy(source: Any, home: Path, st: Store, address: str, *, mode: str, progress: Any) -> CopyResult:
        with lock:
            copying[0] += 1
            peaks["copying"] = max(peaks["copying"], copying[0])
        time.sleep(0.05)
        with lock:
            copying[0] -= 1
        return CopyResult(address, mode)

    def quiesce(address: str, logins: list[str]) -> None:
        with lock:
            waiting[0] += 1
            peaks["waiting"] = max(peaks["waiting"], waiting[0])
        time.sleep(0.8)
        with lock:
            waiting[0] -= 1

    c = make_runner(store, tmp_path, rec, creds, copy_concurrency=2).cfg
    runner = JobRunner(c, store, creds, owner="test", copy=copy,
                       hooks=Hooks(release_held=rec.release, after_migrated=rec.after, quiesce=quiesce))  # fmt: skip
    accounts = [f"u{i}@example.test" for i in range(8)]
    _logins(store, creds, accounts)
    started = time.monotonic()
    runner.start()
    try:
        for who in accounts:
            wait_for(lambda w=who: store.state_of(w) is State.MIGRATED, 20, f"{who} to migrate")  # type: ignore[misc]
    finally:
        runner.stop()
    took = time.monotonic() - started
    assert peaks["copying"] <= 2  # the slots bound the copies
    assert peaks["waiting"] >= 3  # ... not the waits
    # 8 accounts, 2 slots: holding the slots through the 0.8 s waits would take >= 4 x 0.9 s
    assert took < 2.8, took


def test_a_returning_job_goes_before_a_new_one() -> None:
    slots = Slots(1)
    assert slots.try_take() and not slots.try_take()
    back = threading.Thread(target=slots.take)  # a job whose wait is over wants its slot back
    back.start()
    wait_for(lambda: slots._returning == 1, 5, "the returning job to queue")
    slots.give()
    back.join(5)
    assert not back.is_alive() and slots.in_use() == 1
    assert not slots.try_take()  # the new job waits
    slots.give()
    assert slots.try_take()


def test_a_copy_that_finds_every_legacy_connection_taken_is_put_back_without_counting_an_attempt(
    store: Store, tmp_path: Path
) -> None:
    rec, creds = Recorder(), CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds, copy_attempts=1)
    first_login(store, creds)
    rec.fail_with = [SourceBusy("all 4 connections toward the legacy server are in use")]
    run_one(runner, store)
    account = store.get(A)
    assert account is not None and account.state is State.COPYING and account.attempts == 0  # not failed
    (job,) = [j for j in store.jobs(A) if j.status == "queued"]
    assert job.not_before == pytest.approx(time.time() + BUSY_RETRY, abs=5)
    store.wake(A)
    run_one(runner, store)
    account = store.get(A)
    assert account is not None and account.state is State.MIGRATED


def test_an_idle_runner_polls_the_store_no_faster_than_its_interval(store: Store, tmp_path: Path) -> None:
    rec, creds = Recorder(), CredentialCache()
    runner = make_runner(store, tmp_path, rec, creds)
    leases = [0]
    lease = store.lease

    def counted(*args: Any, **kw: Any) -> Any:
        leases[0] += 1
        return lease(*args, **kw)

    store.lease = counted  # type: ignore[method-assign]
    runner.start()
    time.sleep(1.5)
    runner.stop()
    assert leases[0] <= 3  # (a free slot handed back after an empty lease must not spin the loop)
