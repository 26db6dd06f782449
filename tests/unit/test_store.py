"""The state store, every test on both backends (SQLite file, throwaway PostgreSQL cluster).

Views are read with the exact queries Dovecot's sql passdb/userdb run, through a separate connection, the
way Dovecot would see them.
"""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import sqlite3
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.backends import Backend

from sidecar.lab.pgcluster import PgCluster
from sidecar.lab.proc import free_port
from sidecar.states import IllegalTransition, State
from sidecar.store import open_store, schema
from sidecar.store.base import (
    Conflict,
    FolderMark,
    ImportedUser,
    MessageRecord,
    StoreError,
    StoreUnavailable,
    UnknownAccount,
)
from sidecar.store.sql import SqlStore
from sidecar.store.sqlite import SqliteStore

HASH = "{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"

PASSDB = 'SELECT "user", password FROM dovecot_passdb WHERE login = ?'
DENY = "SELECT 'Y' AS nopassword FROM dovecot_deny WHERE login = ?"
USERDB = 'SELECT "user" FROM dovecot_userdb WHERE login = ?'
ITERATE = 'SELECT "user" AS username FROM dovecot_userdb WHERE login = "user" ORDER BY 1'


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(backend: Backend) -> SqlStore:
    s = backend.open()
    assert s.init() == schema.latest()
    return s


def run_threads(n: int, target: Callable[[int], Any]) -> list[Any]:
    """Run target(i) in n threads released at once; results (or the exception raised) by index."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target(i)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return results


# --- schema -------------------------------------------------------------------------------------------------
def test_init_creates_schema_from_empty_and_is_idempotent(backend: Backend) -> None:
    s = backend.open()
    assert s.schema_version() == 0
    assert s.init() == schema.latest()
    assert s.schema_version() == schema.latest()
    assert s.upgrade() == []
    assert s.init() == schema.latest()
    other = backend.open()  # a second node starting up against the same store
    assert other.init() == schema.latest()
    assert other.summary() == {st.value: 0 for st in State}


def test_upgrade_applies_pending_versions_each_in_one_transaction(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = backend.open()
    s.init()
    s.transition("a@example.org", State.COPYING)
    n = schema.latest()
    broken = schema.Migration(
        n + 1,
        "broken",
        {d: ("CREATE TABLE half_done (x INTEGER)", "SELECT * FROM no_such_table") for d in schema.DIALECTS},
    )
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, broken])
    with pytest.raises(StoreError):
        s.upgrade()
    assert s.schema_version() == n
    assert not backend.has_table("half_done")
    good = schema.Migration(
        n + 1, "extra column", {d: ("ALTER TABLE accounts ADD COLUMN note TEXT",) for d in schema.DIALECTS}
    )
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS[:n], good])
    assert s.upgrade() == [n + 1]
    assert s.schema_version() == n + 1
    assert s.upgrade() == []
    assert s.state_of("a@example.org") is State.COPYING  # data kept, updated in place


def test_migrations_are_numbered_without_gaps() -> None:
    n = schema.latest()
    with pytest.raises(ValueError, match=f"expected {n + 1}"):
        schema.pending(0, [*schema.MIGRATIONS, schema.Migration(n + 2, "x", {d: () for d in schema.DIALECTS})])


# --- transitions and views ----------------------------------------------------------------------------------
def views(
    backend: Backend, login: str
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    return backend.dovecot(PASSDB, login), backend.dovecot(DENY, login), backend.dovecot(USERDB, login)


def test_happy_path_and_what_dovecot_sees_at_each_step(backend: Backend, store: SqlStore) -> None:
    a = "alice@example.org"
    assert views(backend, a) == ([], [], [])

    acc = store.transition(a, State.COPYING, expect=None, reason="login verified on legacy")
    assert acc.state is State.COPYING and acc.logins == (a,) and not acc.has_password
    store.set_password_hash(a, HASH)
    store.add_login(a, "ALICE")
    assert views(backend, a) == ([], [], [(a,)])
    assert views(backend, "alice") == ([], [], [(a,)])

    store.transition(a, State.CUTOVER, expect=State.COPYING)
    assert views(backend, a) == ([], [], [(a,)])
    assert store.get(a).migrated_at is None  # type: ignore[union-attr]

    acc = store.transition(a, State.MIGRATED, expect=State.CUTOVER, reason="final delta done")
    assert acc.migrated_at is not None and acc.has_password
    for login in (a, "alice"):
        assert views(backend, login) == ([(a, HASH)], [("Y",)], [(a,)])
    assert views(backend, "bob") == ([], [], [])

    # migrated without a hash (bulk migration, password never seen): neither a passdb nor a deny row, so the
    # first login reaches checkpassword, which verifies it on the legacy server and stores the hash (v2)
    b = "bob@example.org"
    for st in (State.DISCOVERED, State.COPYING, State.CUTOVER, State.MIGRATED):
        store.transition(b, st)
    assert views(backend, b) == ([], [], [(b,)])
    store.set_password_hash(b, HASH)
    assert views(backend, b) == ([(b, HASH)], [("Y",)], [(b,)])
    assert backend.dovecot(ITERATE) == [(a,), (b,)]

    details = [e.detail for e in reversed(store.events(a)) if e.kind == "transition"]
    assert details == [
        "(none) -> copying: login verified on legacy",
        "copying -> cutover",
        "cutover -> migrated: final delta done",
    ]
    assert store.find_by_login("Alice") == store.get(a)
    assert store.summary() == {"discovered": 0, "copying": 0, "cutover": 0, "migrated": 2, "failed": 0}


ILLEGAL: list[tuple[list[State], State]] = [
    ([], State.CUTOVER),
    ([], State.MIGRATED),
    ([], State.FAILED),
    ([State.DISCOVERED], State.CUTOVER),
    ([State.DISCOVERED], State.DISCOVERED),
    ([State.COPYING], State.MIGRATED),
    ([State.COPYING], State.COPYING),
    ([State.COPYING], State.DISCOVERED),
    ([State.COPYING, State.CUTOVER], State.COPYING),
    ([State.COPYING, State.CUTOVER, State.MIGRATED], State.COPYING),
    ([State.COPYING, State.CUTOVER, State.MIGRATED], State.FAILED),
    ([State.COPYING, State.FAILED], State.MIGRATED),
]


@pytest.mark.parametrize(
    ("path", "new"), ILLEGAL, ids=lambda v: "-".join(s.value for s in v) if isinstance(v, list) else v.value
)
def test_illegal_transition_raises_and_changes_nothing(
    store: SqlStore, path: list[State], new: State
) -> None:
    a = "carol@example.org"
    for st in path:
        store.transition(a, st)
    before, events = store.get(a), store.events(a)
    with pytest.raises(IllegalTransition) as info:
        store.transition(a, new)
    assert info.value.new is new
    assert store.get(a) == before
    assert store.events(a) == events


def test_expect_mismatch_is_a_conflict(store: SqlStore) -> None:
    a = "dave@example.org"
    store.transition(a, State.DISCOVERED)
    with pytest.raises(Conflict):
        store.transition(a, State.COPYING, expect=None)
    with pytest.raises(Conflict):
        store.transition(a, State.COPYING, expect=State.FAILED)
    assert store.state_of(a) is State.DISCOVERED
    assert store.transition(a, State.COPYING, expect=State.DISCOVERED).state is State.COPYING


def test_a_failed_account_taken_up_again_gets_a_fresh_series_of_attempts(store: SqlStore) -> None:
    a = "frank@example.org"
    store.transition(a, State.COPYING)
    for n in range(3):
        store.set_error(a, f"connection reset {n}")
    store.transition(a, State.FAILED, reason="3 failures")
    failed = store.get(a)
    assert failed is not None and failed.attempts == 3
    retried = store.transition(a, State.COPYING, expect=State.FAILED, reason="autoport migrate")
    # the job runner gives up after limits.copy_attempts: counting on from 3 would fail it again at once
    assert retried.attempts == 0 and retried.last_error == "connection reset 2"


def test_thirty_threads_creating_the_same_account_one_wins(backend: Backend, store: SqlStore) -> None:
    nodes = [store, backend.open()]  # two "nodes", fifteen threads each
    a = "race@example.org"
    results = run_threads(30, lambda i: nodes[i % 2].transition(a, State.COPYING, reason=f"thread {i}"))
    winners = [r for r in results if not isinstance(r, Exception)]
    assert len(winners) == 1, results
    assert all(isinstance(r, IllegalTransition | Conflict) for r in results if r not in winners), results
    assert [e.kind for e in store.events(a)] == ["transition"]
    assert store.state_of(a) is State.COPYING


def test_thirty_threads_moving_the_same_account_one_wins(backend: Backend, store: SqlStore) -> None:
    nodes = [store, backend.open()]
    a = "move@example.org"
    store.transition(a, State.COPYING)
    results = run_threads(30, lambda i: nodes[i % 2].transition(a, State.CUTOVER, expect=State.COPYING))
    winners = [r for r in results if not isinstance(r, Exception)]
    assert len(winners) == 1, results
    assert all(isinstance(r, Conflict) for r in results if r not in winners), results
    assert len(store.events(a)) == 2


def test_summary_counts_every_state(store: SqlStore) -> None:
    assert store.summary() == {s.value: 0 for s in State}
    paths = {
        "d@x.org": [State.DISCOVERED],
        "c@x.org": [State.COPYING],
        "c2@x.org": [State.DISCOVERED, State.COPYING],
        "u@x.org": [State.COPYING, State.CUTOVER],
        "m@x.org": [State.COPYING, State.CUTOVER, State.MIGRATED],
        "f@x.org": [State.COPYING, State.FAILED],
    }
    for address, path in paths.items():
        for st in path:
            store.transition(address, st)
    assert store.summary() == {"discovered": 1, "copying": 2, "cutover": 1, "migrated": 1, "failed": 1}
    assert [a.address for a in store.accounts(State.COPYING)] == ["c2@x.org", "c@x.org"]
    assert len(list(store.accounts())) == 6


# --- account details ----------------------------------------------------------------------------------------
def test_logins_progress_errors(backend: Backend, store: SqlStore) -> None:
    a, b = "erin@example.org", "frank@example.org"
    store.transition(a, State.COPYING)
    store.transition(b, State.DISCOVERED)
    store.add_login(a, "Erin")
    store.add_login(a, "erin")  # idempotent
    with pytest.raises(Conflict):
        store.add_login(b, "ERIN")
    assert store.get(a).logins == ("erin", a)  # type: ignore[union-attr]
    assert store.find_by_login("erin").address == a  # type: ignore[union-attr]
    assert store.find_by_login("nobody") is None
    assert backend.dovecot(USERDB, "erin") == [(a,)]

    store.set_progress(a, total=10, copied=4, bytes_copied=4096)
    store.set_progress(a, copied=7)
    store.set_error(a, "legacy closed the connection")
    store.touch_login(a)
    acc = store.get(a)
    assert acc is not None
    assert (acc.messages_total, acc.messages_copied, acc.bytes_copied) == (10, 7, 4096)
    assert (acc.attempts, acc.last_error) == (1, "legacy closed the connection")
    assert acc.last_login_at is not None
    store.set_error(a, "")
    assert store.get(a).last_error == ""  # type: ignore[union-attr]

    for call in (
        lambda: store.set_password_hash("ghost@example.org", HASH),
        lambda: store.add_login("ghost@example.org", "ghost"),
        lambda: store.set_progress("ghost@example.org", total=1),
        lambda: store.enqueue("ghost@example.org"),
    ):
        with pytest.raises(UnknownAccount):
            call()
    with pytest.raises(ValueError, match="SCHEME"):
        store.set_password_hash(a, "$argon2id$v=19$no-prefix")
    assert store.get("ghost@example.org") is None and store.state_of("ghost@example.org") is None


def test_events_message_log_and_folder_marks(store: SqlStore) -> None:
    a = "gina@example.org"
    store.transition(a, State.COPYING)
    store.record_event(a, "retry", "attempt 2")
    store.record_event("other@example.org", "sweep-hit", "1 message")
    assert [e.kind for e in store.events(a)] == ["retry", "transition"]
    assert len(store.events()) == 3 and len(store.events(limit=1)) == 1
    assert [(e.address, e.kind) for e in store.events(kind="sweep-hit")] == [("other@example.org", "sweep-hit")]
    assert [e.kind for e in store.events(a, kind="retry")] == ["retry"] and store.events(a, kind="sweep-hit") == []

    recs = [
        MessageRecord("Q1", a, "s@x.org", "<1@x>", "smtp:[legacy]:25", 100, auto_submitted="auto-replied"),
        MessageRecord("Q2", a, "s@x.org", "<2@x>", "lmtp", 200, from_legacy=True, at=5.0),
        MessageRecord("Q2", "h@example.org", "s@x.org", "<2@x>", "retry", 200),
    ]
    store.log_messages(recs)
    store.log_messages([])
    got = store.message_log(a)
    assert [r.queue_id for r in got] == ["Q2", "Q1"]
    assert got[0] == recs[1]
    assert got[1].auto_submitted == "auto-replied" and got[1].at > 0 and got[1].from_legacy is False
    assert len(store.message_log()) == 3
    # every field comes back in its place (message_log_since builds the records positionally)
    full = MessageRecord("Q3", "i@example.org", "s@y.org", "<3@y>", "lmtp", 300, "auto-generated", "bulk",
                         "<l.example.org>", "192.0.2.5", "i@example.org", True, 7.0)  # fmt: skip
    store.log_messages([full])
    since = store.message_log_since(0.0)
    assert since[0] == recs[1] and since[1] == full and {r.queue_id for r in since[2:]} == {"Q1", "Q2"}
    assert since[0].from_legacy is True and since[-1].from_legacy is False
    assert store.message_log_since(6.0)[0] == full

    assert store.folder_marks(a) == {}
    store.set_folder_mark(a, FolderMark("INBOX", 1234, 10, 10))
    store.set_folder_mark(a, FolderMark("INBOX", 1234, 20, 19))
    store.set_folder_mark(a, FolderMark("Sent Items", 99, 3, 3))
    assert store.folder_marks(a) == {
        "INBOX": FolderMark("INBOX", 1234, 20, 19),
        "Sent Items": FolderMark("Sent Items", 99, 3, 3),
    }
    store.clear_folder_marks(a, "INBOX")
    assert list(store.folder_marks(a)) == ["Sent Items"]
    store.clear_folder_marks(a)
    assert store.folder_marks(a) == {}


# --- jobs ---------------------------------------------------------------------------------------------------
def test_thirty_threads_enqueueing_the_same_job_make_one(backend: Backend, store: SqlStore) -> None:
    nodes = [store, backend.open()]
    a = "henry@example.org"
    store.transition(a, State.COPYING)
    results = run_threads(30, lambda i: nodes[i % 2].enqueue(a, "copy"))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len({r.id for r in results}) == 1
    assert len(store.jobs(a)) == 1
    store.enqueue(a, "sweep")
    assert sorted(j.kind for j in store.jobs(a)) == ["copy", "sweep"]


def test_two_owners_never_lease_the_same_job(backend: Backend, store: SqlStore) -> None:
    nodes = [store, backend.open()]
    addresses = [f"user{i}@example.org" for i in range(20)]
    for a in addresses:
        store.transition(a, State.COPYING)
        store.enqueue(a)
    taken: list[tuple[str, int]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        owner = f"node{i % 2}-t{i}"
        while (job := nodes[i % 2].lease(owner)) is not None:
            with lock:
                taken.append((owner, job.id))
            time.sleep(0.005)  # "work", so that every thread gets its turn

    run_threads(8, worker)
    ids = [j for _, j in taken]
    assert sorted(ids) == sorted(j.id for j in store.jobs())
    assert len(ids) == len(set(ids)) == 20
    assert {j.status for j in store.jobs()} == {"leased"}
    assert len({o for o, _ in taken}) > 1


def test_expired_lease_is_taken_over_and_the_old_owner_loses_it(backend: Backend) -> None:
    clock = Clock()
    s = backend.open(clock=clock)
    s.init()
    a = "ivy@example.org"
    s.transition(a, State.COPYING)
    job = s.enqueue(a)
    assert s.enqueue(a) == job

    mine = s.lease("node-a", seconds=60)
    assert mine is not None and mine.id == job.id and mine.lease_owner == "node-a" and mine.attempts == 1
    assert s.lease("node-b", seconds=60) is None
    clock.now += 30
    assert s.renew(job.id, "node-a", seconds=60)
    assert not s.renew(job.id, "node-b")
    clock.now += 59
    assert s.lease("node-b") is None  # renewed: not expired yet
    clock.now += 2
    theirs = s.lease("node-b", seconds=60)
    assert (
        theirs is not None and theirs.id == job.id and theirs.lease_owner == "node-b" and theirs.attempts == 2
    )
    assert not s.renew(job.id, "node-a")
    with pytest.raises(Conflict):
        s.finish(job.id, "node-a")
    s.finish(job.id, "node-b")
    assert [j.status for j in s.jobs(a)] == ["done"]
    assert s.enqueue(a).id != job.id  # a finished job does not block a new one


def test_finish_retry_and_failure(backend: Backend) -> None:
    clock = Clock()
    s = backend.open(clock=clock)
    s.init()
    a = "jack@example.org"
    s.transition(a, State.COPYING)
    job = s.enqueue(a, not_before=clock.now + 10)
    assert s.lease("n") is None  # not due yet
    clock.now += 10
    assert s.lease("n") is not None
    s.finish(job.id, "n", error="legacy timed out", retry_at=clock.now + 300)
    (j,) = s.jobs(a)
    assert (j.status, j.last_error, j.not_before, j.lease_owner) == (
        "queued",
        "legacy timed out",
        clock.now + 300,
        "",
    )
    assert s.enqueue(a).id == job.id  # still the open job
    assert s.lease("n") is None
    clock.now += 301
    again = s.lease("n", kinds=("sweep", "copy"))
    assert again is not None and again.attempts == 2
    assert s.lease("n", kinds=("sweep",)) is None
    s.finish(job.id, "n", error="mailbox too large")
    assert [j.status for j in s.jobs(a)] == ["failed"]


# --- SQLite specifics ---------------------------------------------------------------------------------------
@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the dovecot user can reach (pytest's tmp_path is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="autoport-store-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_dovecot_sqlite3(db: Path, query: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "dovecot", "--", "sqlite3", "-batch", str(db), query],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
    )


def test_sqlite_files_are_readable_by_dovecot_while_open_in_wal_mode(shared_dir: Path) -> None:
    db = shared_dir / "store" / "state.db"
    s = open_store(f"sqlite:///{db}", dovecot_group="dovecot")
    try:
        s.init()
        a = "kim@example.org"
        for st in (State.COPYING, State.CUTOVER, State.MIGRATED):
            s.transition(a, st)
        s.set_password_hash(a, HASH)

        gid = grp.getgrnam("dovecot").gr_gid
        assert stat.S_IMODE(db.parent.stat().st_mode) == 0o2750 and db.parent.stat().st_gid == gid
        for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            st = f.stat()
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, gid), f
        with contextlib.closing(sqlite3.connect(db)) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)

        p = as_dovecot_sqlite3(db, f"SELECT \"user\", password FROM dovecot_passdb WHERE login = '{a}'")
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == f"{a}|{HASH}"
        # a write after the reader came and went is visible too (from the WAL, not checkpointed)
        s.add_login(a, "kim")
        p = as_dovecot_sqlite3(db, "SELECT \"user\" FROM dovecot_userdb WHERE login = 'kim'")
        assert p.stdout.strip() == a, p.stderr
    finally:
        s.close()
    # with the store closed Dovecot still reads: -wal and -shm persist (SQLITE_FCNTL_PERSIST_WAL), read-only
    assert Path(f"{db}-shm").exists() and Path(f"{db}-wal").exists()
    p = as_dovecot_sqlite3(db, "SELECT login FROM dovecot_deny ORDER BY login")
    assert (p.returncode, p.stdout.split()) == (0, ["kim", a]), p.stderr
    # readable, never writable by Dovecot's group (issue 14)
    p = as_dovecot_sqlite3(db, "UPDATE accounts SET password_hash = '{PLAIN}x'")
    assert p.returncode != 0 and "readonly" in p.stderr, p.stderr


def test_sqlite_init_repairs_the_empty_root_only_file_dovecot_leaves(shared_dir: Path) -> None:
    # DESIGN.md: Dovecot's sqlite driver creates an empty 0600 database when the file is missing
    db = shared_dir / "state.db"
    db.touch(0o600)
    inode = db.stat().st_ino
    s = open_store(f"sqlite:///{db}")
    try:
        s.init()
        st = db.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid, st.st_ino) == (
            0o640,
            grp.getgrnam("dovecot").gr_gid,
            inode,
        )
        assert s.summary()["migrated"] == 0
    finally:
        s.close()


def test_sqlite_store_is_not_created_by_a_plain_open(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    s = open_store(f"sqlite:///{db}")
    try:
        assert s.schema_version() == 0
        with pytest.raises(StoreUnavailable, match="unable to open"):
            s.get("x@example.org")
        assert not db.exists()
    finally:
        s.close()


def test_sqlite_locked_or_gone_is_unavailable(tmp_path: Path) -> None:
    db = tmp_path / "d" / "state.db"
    s = SqliteStore(str(db), busy_timeout=0.2)
    s.init()
    s.transition("lee@example.org", State.COPYING)
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailable, match="locked"):
            s.transition("lee@example.org", State.CUTOVER)
        other.execute("ROLLBACK")
        assert s.state_of("lee@example.org") is State.COPYING
    finally:
        other.close()

    shutil.rmtree(db.parent)
    # a thread that has no connection yet (the daemon's next worker) cannot open the file
    (result,) = run_threads(1, lambda i: s.state_of("lee@example.org"))
    assert isinstance(result, StoreUnavailable), result
    s.close()


# --- PostgreSQL specifics -----------------------------------------------------------------------------------
@pytest.mark.postgres
def test_postgres_grants_the_views_to_the_dovecot_role(pg_cluster: PgCluster) -> None:
    import psycopg

    pg_cluster.create_role("dovecot_ro")
    url = pg_cluster.create_database()
    s = open_store(url, dovecot_role="dovecot_ro")
    try:
        s.init()
        a = "mia@example.org"
        for st in (State.COPYING, State.CUTOVER, State.MIGRATED):
            s.transition(a, st)
        s.set_password_hash(a, HASH)
        ro_url = url.replace("postgres@", "dovecot_ro@")
        with psycopg.connect(ro_url, autocommit=True) as conn:
            q = PASSDB.replace("?", "%s")
            assert conn.execute(q, (a,)).fetchall() == [(a, HASH)]
            assert conn.execute(DENY.replace("?", "%s"), (a,)).fetchall() == [("Y",)]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT password_hash FROM accounts")
        # a role that does not exist is skipped, not an error
        s2 = open_store(url, dovecot_role="no_such_role")
        assert s2.init() == schema.latest()
        s2.close()
    finally:
        s.close()
        pg_cluster.drop_database(url.rsplit("/", 1)[1])


@pytest.mark.postgres
def test_postgres_down_is_unavailable_and_recovers() -> None:
    with PgCluster() as pg:
        s = open_store(pg.url())
        try:
            s.init()
            s.transition("ned@example.org", State.COPYING)
            pg.stop()
            with pytest.raises(StoreUnavailable) as info:
                s.state_of("ned@example.org")
            assert info.value.__cause__ is None and info.value.__suppress_context__
            with pytest.raises(StoreUnavailable):
                s.state_of("ned@example.org")  # reconnecting fails too
            pg.start()
            assert s.state_of("ned@example.org") is State.COPYING
        finally:
            s.close()


@pytest.mark.postgres
def test_postgres_unavailable_message_never_shows_the_password() -> None:
    secret = "Sup3rSecretPw"
    s = open_store(f"postgresql://autoport:{secret}@127.0.0.1:{free_port()}/autoport")
    with pytest.raises(StoreUnavailable) as info:
        s.schema_version()
    s.close()
    assert secret not in str(info.value) and secret not in repr(info.value)
    assert "127.0.0.1" in str(info.value)
    assert secret not in repr(s)


def test_open_store_rejects_unknown_schemes_without_echoing_the_url() -> None:
    with pytest.raises(ValueError) as info:
        open_store("mysql://root:hunter2@db/x")
    assert "hunter2" not in str(info.value)


def test_wake_makes_a_waiting_job_runnable_now(store: SqlStore) -> None:
    store.transition("w@example.org", State.COPYING)
    job = store.enqueue("w@example.org", "copy")
    leased = store.lease("n1")
    assert leased is not None and leased.id == job.id
    store.finish(job.id, "n1", error="waiting for credentials", retry_at=time.time() + 300)
    assert store.lease("n1") is None
    assert store.wake("w@example.org", "copy") is True
    again = store.lease("n1")
    assert again is not None and again.id == job.id
    assert store.wake("w@example.org", "copy") is False  # leased, nothing queued to wake


def test_inventory_replaces_one_source_at_a_time_and_exclusions_keep_their_date(backend: Backend) -> None:
    clock = Clock(1000.0)
    s = backend.open(clock=clock)
    s.init()
    change = s.set_inventory("legacy", "account", ["a@example.org", "b@example.org"])
    assert change.added == ("a@example.org", "b@example.org") and change.removed == () and change.kept == 0
    s.set_inventory("ldap", "account", {"b@example.org": "uid=b,ou=people"})
    s.set_inventory("legacy", "shared-folder", {"shared/Sales": "listed by admin"})
    # the legacy server no longer lists a; c is new; b keeps its first_seen
    first_b = next(e for e in s.inventory("account") if e.name == "b@example.org" and e.source == "legacy")
    clock.now += 60
    change = s.set_inventory("legacy", "account", ["b@example.org", "c@example.org"])
    assert change.added == ("c@example.org",) and change.removed == ("a@example.org",) and change.kept == 1
    rows = s.inventory("account")
    assert [(e.name, e.source) for e in rows] == [
        ("b@example.org", "ldap"),
        ("b@example.org", "legacy"),
        ("c@example.org", "legacy"),
    ]
    again_b = next(e for e in rows if e.name == "b@example.org" and e.source == "legacy")
    assert again_b.first_seen == first_b.first_seen and again_b.last_seen == first_b.last_seen + 60
    assert next(e for e in rows if e.source == "ldap").detail == "uid=b,ou=people"
    assert [e.name for e in s.inventory("shared-folder")] == ["shared/Sales"]
    assert len(s.inventory()) == 4

    with pytest.raises(ValueError):
        s.set_exclusion("c@example.org", "  ")
    first = s.set_exclusion("c@example.org", "left the company")
    clock.now += 60
    again = s.set_exclusion("c@example.org", "left the company in 2019")
    assert again.created_at == first.created_at and again.reason == "left the company in 2019"
    assert [x.address for x in s.exclusions()] == ["c@example.org"]
    assert s.remove_exclusion("c@example.org") and not s.remove_exclusion("c@example.org")
    assert s.exclusions() == []


# --- issue 14: one store call per verified login; the login map (schema v5) ---------------------------------


def test_record_login_writes_everything_in_one_call(backend: Backend, store: SqlStore) -> None:
    a = "alice@example.org"
    assert store.record_login(a, "ALICE", password_hash=HASH) is State.COPYING
    acc = store.get(a)
    assert acc is not None and acc.state is State.COPYING and acc.has_password and acc.last_login_at
    assert acc.logins == ("alice", a)
    assert [(j.kind, j.status) for j in store.jobs(a)] == [("copy", "queued")]
    # again (another login): state kept, no second job, no new transition event
    assert store.record_login(a, "alice") is State.COPYING
    assert len(store.jobs(a)) == 1
    assert [e.detail for e in store.events(a) if e.kind == "transition"] == ["(none) -> copying: first login"]
    # failed -> copying resets the attempts; cutover stays
    store.set_error(a, "boom")
    store.transition(a, State.FAILED)
    assert store.record_login(a, a) is State.COPYING and store.get(a).attempts == 0  # type: ignore[union-attr]
    store.transition(a, State.CUTOVER)
    assert store.record_login(a, a) is State.CUTOVER
    store.transition(a, State.MIGRATED)
    with pytest.raises(IllegalTransition):
        store.record_login(a, a, password_hash="{ARGON2ID}other")
    assert store.password_hash(a) == HASH  # nothing written
    # a migrated account's first local login: no state change, no job, the hash stored
    store.record_login(a, "a.l", password_hash="{ARGON2ID}new", start_copy=False)
    assert store.password_hash(a) == "{ARGON2ID}new" and store.state_of(a) is State.MIGRATED
    with pytest.raises(UnknownAccount):
        store.record_login("ghost@example.org", "ghost", start_copy=False)
    with pytest.raises(ValueError):
        store.record_login(a, a, password_hash="plain")


def test_record_login_never_moves_a_login_of_another_account(store: SqlStore) -> None:
    store.record_login("bob@example.org", "shared")
    store.record_login("carol@example.org", "shared")
    assert store.find_by_login("shared").address == "bob@example.org"  # type: ignore[union-attr]


def test_concurrent_record_login_makes_one_account_and_one_job(backend: Backend, store: SqlStore) -> None:
    other = backend.open()
    results = run_threads(8, lambda i: (store if i % 2 else other).record_login("kim@example.org", "kim"))
    assert results == [State.COPYING] * 8
    assert len(store.jobs("kim@example.org")) == 1


def test_imported_users_and_what_dovecot_sees(backend: Backend, store: SqlStore) -> None:
    j = "john.smith@example.org"
    assert store.import_users([ImportedUser("jsmith", j, ("sales@example.org", "js@example.net"))]) == 1
    assert store.find_imported("jsmith") == ImportedUser("jsmith", j, ("js@example.net", "sales@example.org"))
    assert store.find_imported(j) == store.find_imported("sales@example.org") == store.find_imported("jsmith")
    assert store.find_imported("nobody") is None
    assert views(backend, "jsmith") == ([], [], [])  # no account yet
    store.record_login(j, "jsmith", password_hash=HASH)
    for login in ("jsmith", "sales@example.org", j):
        assert views(backend, login) == ([], [], [(j,)])
    store.transition(j, State.CUTOVER)
    store.transition(j, State.MIGRATED)
    for login in ("jsmith", "sales@example.org", "js@example.net", j):
        assert views(backend, login) == ([(j, HASH)], [("Y",)], [(j,)])
    acc = store.get(j)
    assert acc is not None and set(acc.logins) == {"jsmith", j, "sales@example.org", "js@example.net"}
    # re-import replaces the extra addresses; conflicts write nothing
    store.import_users([ImportedUser("jsmith", j, ("sales@example.org",))])
    assert store.find_imported("js@example.net") is None
    with pytest.raises(Conflict):
        store.import_users([ImportedUser("mary", "mary@example.org"), ImportedUser("bad", j)])
    with pytest.raises(Conflict):
        store.import_users([ImportedUser("mary", "mary@example.org", ("sales@example.org",))])
    assert [u.login for u in store.imported_users()] == ["jsmith"]


def test_a_forked_child_reads_on_a_connection_of_its_own(store: SqlStore) -> None:
    """The socketmap workers are forked from the daemon: a child never uses the parent's connection (one
    session shared by two processes corrupts both), and the parent's connection keeps working after."""
    store.transition("ann@example.org", State.COPYING)
    parent_conn = store._conns.get()  # type: ignore[attr-defined]
    assert parent_conn is not None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            fresh = store._conns.get() is None  # type: ignore[attr-defined]
            state = store.state_of_either("ann+x@example.org", "ann@example.org")
            os.write(w, b"1" if fresh and state is State.COPYING else b"0")
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    assert os.waitpid(pid, 0)[1] == 0
    assert store._conns.get() is parent_conn  # type: ignore[attr-defined]
    assert store.state_of("ann@example.org") is State.COPYING
    assert store.state_of_either("ann+x@example.org", "ann@example.org") is State.COPYING
    assert store.state_of_either("ann+x@example.org", "bob@example.org") is None
