"""The SQL shared by both store backends.

SqlStore implements every Store method once, in SQL both SQLite (3.35+: RETURNING, ON CONFLICT) and
PostgreSQL understand, with `?` placeholders. A backend supplies the connections and transactions
(_write/_read), error translation, row locking clauses and the schema lock:

- SQLite: a write transaction is BEGIN IMMEDIATE, which holds the database's single write lock, so the
  locking clauses are empty.
- PostgreSQL: READ COMMITTED transactions; rows are locked with SELECT ... FOR UPDATE, queue rows taken with
  FOR UPDATE SKIP LOCKED, and migrations serialised by an advisory lock.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

from sidecar.states import State, check_transition
from sidecar.store import schema
from sidecar.store.base import (
    KICK_KINDS,
    Account,
    Alias,
    Conflict,
    Event,
    Exclusion,
    FolderMark,
    ImportedUser,
    InventoryChange,
    InventoryEntry,
    Job,
    Kick,
    MessageRecord,
    Store,
    StoreError,
    SweepBlock,
    UnknownAccount,
)

log = logging.getLogger(__name__)

Row = tuple[Any, ...]
Clock = Callable[[], float]

_ACCOUNT_COLS = (
    "address, state, created_at, updated_at, password_hash, last_login_at, migrated_at, "
    "messages_total, messages_copied, bytes_copied, attempts, last_error"
)
_JOB_COLS = "id, address, kind, status, attempts, not_before, lease_owner, lease_until, last_error"
_EVENT_COLS = "id, at, address, kind, detail"
_MSG_FIELDS = (
    "queue_id",
    "recipient",
    "sender",
    "message_id",
    "route",
    "size",
    "auto_submitted",
    "precedence",
    "list_id",
    "client_addr",
    "auth_user",
    "from_legacy",
    "at",
)
_OPEN = "('queued', 'leased')"


class Cursor:
    """A driver cursor speaking `?` placeholders on both dialects."""

    def __init__(self, cur: Any, *, pyformat: bool) -> None:
        self._cur = cur
        self._pyformat = pyformat

    def _sql(self, sql: str) -> str:
        # Our SQL never contains a literal '?' or '%': the rewrite is exact.
        return sql.replace("?", "%s") if self._pyformat else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        if params:
            self._cur.execute(self._sql(sql), tuple(params))
        else:  # no placeholders to rewrite: the text goes as it is (a migration may contain '%' or '?')
            self._cur.execute(sql)
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._cur.executemany(self._sql(sql), [tuple(r) for r in rows])

    def fetchone(self) -> Row | None:
        row = self._cur.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[Row]:
        return [tuple(r) for r in self._cur.fetchall()]

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)


class _Raced(Exception):
    """Another transaction inserted the row we meant to create: roll back and look again."""


def _account(row: Row, logins: Sequence[str]) -> Account:
    return Account(
        address=row[0],
        state=State(row[1]),
        created_at=row[2],
        updated_at=row[3],
        has_password=bool(row[4]),
        logins=tuple(logins),
        last_login_at=row[5],
        migrated_at=row[6],
        messages_total=row[7],
        messages_copied=row[8],
        bytes_copied=row[9],
        attempts=row[10],
        last_error=row[11],
    )


def _job(row: Row) -> Job:
    return Job(
        id=int(row[0]),
        address=row[1],
        kind=row[2],
        status=row[3],
        attempts=row[4],
        not_before=row[5],
        lease_owner=row[6],
        lease_until=row[7],
        last_error=row[8],
    )


def _transition_detail(old: State | None, new: State, reason: str) -> str:
    text = f"{old.value if old else '(none)'} -> {new.value}"
    return f"{text}: {reason}" if reason else text


class SqlStore(Store):
    dialect: ClassVar[schema.Dialect]
    for_update: ClassVar[str] = ""  # appended to SELECTs that lock the rows they read
    skip_locked: ClassVar[str] = ""  # appended to the SELECT that takes a queue row

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock

    # --- backend hooks -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _write(self) -> AbstractContextManager[Cursor]:
        """A write transaction (committed on success, rolled back on any exception)."""

    @abc.abstractmethod
    def _read(self) -> AbstractContextManager[Cursor]:
        """A consistent read (one transaction)."""

    @abc.abstractmethod
    def _select(self, sql: str, params: Sequence[Any]) -> list[Row]:
        """One SELECT outside any transaction (a single statement is its own consistent read), for hot paths."""

    @abc.abstractmethod
    def _schema_lock(self, cur: Cursor) -> None:
        """Serialise migrations between processes (inside the migration's transaction)."""

    @abc.abstractmethod
    def _table_exists(self, cur: Cursor, name: str) -> bool: ...

    def _after_init(self) -> None:
        """Permissions, grants: whatever the backend does once the schema is current."""

    # --- schema -------------------------------------------------------------------------------------------
    def init(self) -> int:
        self.upgrade()
        version = self.schema_version()
        if version > schema.latest():
            log.warning(
                "store schema version %d is newer than this autoport knows (%d)", version, schema.latest()
            )
        self._after_init()
        return version

    def upgrade(self) -> list[int]:
        applied: list[int] = []
        for m in schema.pending(0):
            with self._write() as cur:
                self._schema_lock(cur)
                cur.execute(schema.VERSION_TABLE[self.dialect])
                if m.version <= self._version(cur):
                    continue
                for statement in m.statements(self.dialect):
                    cur.execute(statement)
                cur.execute(
                    "INSERT INTO schema_version (version, applied_at, description) VALUES (?, ?, ?)",
                    (m.version, self._clock(), m.description),
                )
            log.info("store schema upgraded to version %d: %s", m.version, m.description)
            applied.append(m.version)
        return applied

    def schema_version(self) -> int:
        with self._read() as cur:
            return self._version(cur)

    def _version(self, cur: Cursor) -> int:
        if not self._table_exists(cur, "schema_version"):
            return 0
        row = cur.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    # --- accounts -----------------------------------------------------------------------------------------
    def _load_account(self, cur: Cursor, address: str) -> Account | None:
        row = cur.execute(f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE address = ?", (address,)).fetchone()
        if row is None:
            return None
        logins = [
            r[0]
            for r in cur.execute(
                "SELECT login FROM logins WHERE address = ? UNION SELECT login FROM imported_users WHERE address = ? "
                "UNION SELECT x.address FROM imported_addresses x JOIN imported_users u ON u.login = x.login "
                "WHERE u.address = ? ORDER BY 1",
                (address, address, address),
            ).fetchall()
        ]
        return _account(row, logins)

    def _require(self, cur: Cursor, address: str, *, lock: bool = False) -> None:
        sql = "SELECT 1 FROM accounts WHERE address = ?" + (self.for_update if lock else "")
        if cur.execute(sql, (address,)).fetchone() is None:
            raise UnknownAccount(f"no account {address}")

    def get(self, address: str) -> Account | None:
        with self._read() as cur:
            return self._load_account(cur, address)

    def find_by_login(self, login: str) -> Account | None:
        with self._read() as cur:
            row = cur.execute("SELECT address FROM logins WHERE login = ?", (login.lower(),)).fetchone()
            return None if row is None else self._load_account(cur, row[0])

    def state_of(self, address: str) -> State | None:
        rows = self._select("SELECT state FROM accounts WHERE address = ?", (address,))
        return State(rows[0][0]) if rows else None

    def state_of_either(self, address: str, fallback: str) -> State | None:
        """The state of `address`, else of `fallback` (its base address): one SELECT, no BEGIN."""
        rows = self._select("SELECT address, state FROM accounts WHERE address IN (?, ?)", (address, fallback))
        found: dict[str, str] = {r[0]: r[1] for r in rows}
        state = found.get(address, found.get(fallback))
        return None if state is None else State(state)

    def transition(
        self, address: str, new: State, *, expect: State | object | None = ..., reason: str = ""
    ) -> Account:
        new = State(new)
        for _ in range(10):
            try:
                return self._transition_once(address, new, expect, reason)
            except _Raced:
                continue
        raise Conflict(f"{address}: kept losing the race to create the account")

    def _transition_once(self, address: str, new: State, expect: object, reason: str) -> Account:
        with self._write() as cur:
            row = cur.execute(
                "SELECT state FROM accounts WHERE address = ?" + self.for_update, (address,)
            ).fetchone()
            old = None if row is None else State(row[0])
            if expect is not ... and expect != old:
                shown = expect.value if isinstance(expect, State) else "(none)"
                raise Conflict(f"{address}: expected {shown}, found {old.value if old else '(none)'}")
            check_transition(address, old, new)
            now = self._clock()
            if row is None:
                cur.execute(
                    "INSERT INTO accounts (address, state, created_at, updated_at, migrated_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (address) DO NOTHING",
                    (address, new.value, now, now, now if new is State.MIGRATED else None),
                )
                if cur.rowcount != 1:
                    raise _Raced
                # The own address is always a login name; it wins over an alias recorded for another account.
                cur.execute(
                    "INSERT INTO logins (login, address) VALUES (?, ?) "
                    "ON CONFLICT (login) DO UPDATE SET address = excluded.address",
                    (address.lower(), address),
                )
            else:
                migrated = ", migrated_at = ?" if new is State.MIGRATED else ""
                # leaving `failed` starts a new series of copy attempts (its last_error stays for the record)
                retried = ", attempts = 0" if old is State.FAILED else ""
                cur.execute(
                    f"UPDATE accounts SET state = ?, updated_at = ?{migrated}{retried} WHERE address = ?",
                    (new.value, now, *((now,) if migrated else ()), address),
                )
            self._event(cur, address, "transition", _transition_detail(old, new, reason), now)
            account = self._load_account(cur, address)
        assert account is not None
        return account

    def set_password_hash(self, address: str, password_hash: str) -> None:
        if not password_hash.startswith("{"):
            # a hash without its {SCHEME} prefix would be read by Dovecot as plaintext
            raise ValueError("password hash must start with its Dovecot {SCHEME} prefix")
        self._update(address, "password_hash = ?", (password_hash,))

    def add_login(self, address: str, login: str) -> None:
        login = login.lower()
        with self._write() as cur:
            self._require(cur, address)
            cur.execute(
                "INSERT INTO logins (login, address) VALUES (?, ?) ON CONFLICT (login) DO NOTHING",
                (login, address),
            )
            row = cur.execute("SELECT address FROM logins WHERE login = ?", (login,)).fetchone()
            if row is None or row[0] != address:
                raise Conflict(f"login {login} belongs to another account")

    def touch_login(self, address: str) -> None:
        self._update(address, "last_login_at = ?", (self._clock(),))

    def record_login(
        self, address: str, login: str, *, password_hash: str | None = None, start_copy: bool = True
    ) -> State:
        if password_hash is not None and not password_hash.startswith("{"):
            raise ValueError("password hash must start with its Dovecot {SCHEME} prefix")
        for _ in range(10):
            try:
                return self._record_login_once(address, login.lower(), password_hash, start_copy)
            except _Raced:
                continue
        raise Conflict(f"{address}: kept losing the race to create the account")

    def _record_login_once(self, address: str, login: str, password_hash: str | None, start_copy: bool) -> State:
        with self._write() as cur:
            row = cur.execute(
                "SELECT state FROM accounts WHERE address = ?" + self.for_update, (address,)
            ).fetchone()
            old = None if row is None else State(row[0])
            now = self._clock()
            new = old
            if start_copy and old not in (State.COPYING, State.CUTOVER):
                new = State.COPYING
                check_transition(address, old, new)
                if row is None:
                    cur.execute(
                        "INSERT INTO accounts (address, state, created_at, updated_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (address) DO NOTHING",
                        (address, new.value, now, now),
                    )
                    if cur.rowcount != 1:
                        raise _Raced
                    cur.execute(
                        "INSERT INTO logins (login, address) VALUES (?, ?) "
                        "ON CONFLICT (login) DO UPDATE SET address = excluded.address",
                        (address.lower(), address),
                    )
                else:
                    retried = ", attempts = 0" if old is State.FAILED else ""
                    cur.execute(
                        f"UPDATE accounts SET state = ?, updated_at = ?{retried} WHERE address = ?",
                        (new.value, now, address),
                    )
                self._event(cur, address, "transition", _transition_detail(old, new, "first login"), now)
            elif row is None:
                raise UnknownAccount(f"no account {address}")
            assert new is not None
            # a login already naming another account stays with it (the caller's mapping decided the account)
            cur.execute(
                "INSERT INTO logins (login, address) VALUES (?, ?) ON CONFLICT (login) DO NOTHING", (login, address)
            )
            sets = "last_login_at = ?, updated_at = ?"
            params: list[Any] = [now, now]
            if password_hash is not None:
                sets += ", password_hash = ?"
                params.append(password_hash)
            cur.execute(f"UPDATE accounts SET {sets} WHERE address = ?", (*params, address))
            if start_copy:
                cur.execute(
                    "INSERT INTO jobs (address, kind, status, not_before, created_at, updated_at) "
                    f"VALUES (?, 'copy', 'queued', 0, ?, ?) ON CONFLICT (address, kind) WHERE status IN {_OPEN} "
                    "DO NOTHING",
                    (address, now, now),
                )
        return new

    def password_hash(self, address: str) -> str | None:
        with self._read() as cur:
            row = cur.execute("SELECT password_hash FROM accounts WHERE address = ?", (address,)).fetchone()
        return None if row is None or not row[0] else str(row[0])

    def set_progress(
        self,
        address: str,
        *,
        total: int | None = None,
        copied: int | None = None,
        bytes_copied: int | None = None,
    ) -> None:
        sets: list[str] = []
        params: list[Any] = []
        columns = (("messages_total", total), ("messages_copied", copied), ("bytes_copied", bytes_copied))
        for column, value in columns:
            if value is not None:
                sets.append(f"{column} = ?")
                params.append(value)
        if sets:
            self._update(address, ", ".join(sets), params)

    def set_error(self, address: str, error: str) -> None:
        if error:
            self._update(address, "last_error = ?, attempts = attempts + 1", (error,))
        else:
            self._update(address, "last_error = ?", ("",))

    def _update(self, address: str, sets: str, params: Sequence[Any]) -> None:
        with self._write() as cur:
            cur.execute(
                f"UPDATE accounts SET {sets}, updated_at = ? WHERE address = ?",
                (*params, self._clock(), address),
            )
            if cur.rowcount != 1:
                raise UnknownAccount(f"no account {address}")

    def accounts(self, state: State | None = None) -> Iterator[Account]:
        where, params = ("WHERE a.state = ?", (State(state).value,)) if state is not None else ("", ())
        with self._read() as cur:
            rows = cur.execute(
                f"SELECT {_ACCOUNT_COLS} FROM accounts a {where} ORDER BY address", params
            ).fetchall()
            logins: dict[str, list[str]] = {}
            for login, address in cur.execute(
                f"SELECT l.login, l.address FROM logins l JOIN accounts a ON a.address = l.address {where} "
                "ORDER BY l.login",
                params,
            ).fetchall():
                logins.setdefault(address, []).append(login)
        for row in rows:
            yield _account(row, logins.get(row[0], ()))

    def summary(self) -> dict[str, int]:
        counts = {s.value: 0 for s in State}
        with self._read() as cur:
            for state, n in cur.execute("SELECT state, COUNT(*) FROM accounts GROUP BY state").fetchall():
                counts[state] = int(n)
        return counts

    # --- jobs ---------------------------------------------------------------------------------------------
    def enqueue(self, address: str, kind: str = "copy", *, not_before: float = 0.0) -> Job:
        # Most calls find the job already queued (every login asks): answer those without the write lock.
        with self._read() as cur:
            row = cur.execute(
                f"SELECT {_JOB_COLS} FROM jobs WHERE address = ? AND kind = ? AND status IN {_OPEN}",
                (address, kind),
            ).fetchone()
        if row is not None:
            return _job(row)
        for _ in range(10):
            with self._write() as cur:
                self._require(cur, address)
                now = self._clock()
                cur.execute(
                    "INSERT INTO jobs (address, kind, status, not_before, created_at, updated_at) "
                    f"VALUES (?, ?, 'queued', ?, ?, ?) ON CONFLICT (address, kind) WHERE status IN {_OPEN} "
                    "DO NOTHING",
                    (address, kind, not_before, now, now),
                )
                row = cur.execute(
                    f"SELECT {_JOB_COLS} FROM jobs WHERE address = ? AND kind = ? AND status IN {_OPEN}",
                    (address, kind),
                ).fetchone()
            if row is not None:
                return _job(row)
            # the open job we collided with was finished in between: try again
        raise Conflict(f"{address}: could not enqueue a {kind} job")

    def wake(self, address: str, kind: str = "copy") -> bool:
        with self._write() as cur:
            cur.execute(
                "UPDATE jobs SET not_before = 0, updated_at = ? "
                "WHERE address = ? AND kind = ? AND status = 'queued' AND not_before > 0",
                (self._clock(), address, kind),
            )
            return bool(cur.rowcount == 1)

    def lease(self, owner: str, *, kinds: tuple[str, ...] = ("copy",), seconds: float = 60.0) -> Job | None:
        if not owner:
            raise ValueError("lease owner must not be empty")
        if not kinds:
            return None
        marks = ", ".join("?" for _ in kinds)
        with self._write() as cur:
            now = self._clock()
            row = cur.execute(
                "UPDATE jobs SET status = 'leased', lease_owner = ?, lease_until = ?, "
                "attempts = attempts + 1, updated_at = ? "
                f"WHERE id = (SELECT id FROM jobs WHERE kind IN ({marks}) AND "
                "((status = 'queued' AND not_before <= ?) OR (status = 'leased' AND lease_until < ?)) "
                f"ORDER BY not_before, id LIMIT 1{self.skip_locked}) RETURNING {_JOB_COLS}",
                (owner, now + seconds, now, *kinds, now, now),
            ).fetchone()
        return None if row is None else _job(row)

    def renew(self, job_id: int, owner: str, *, seconds: float = 60.0) -> bool:
        with self._write() as cur:
            now = self._clock()
            cur.execute(
                "UPDATE jobs SET lease_until = ?, updated_at = ? "
                "WHERE id = ? AND lease_owner = ? AND status = 'leased'",
                (now + seconds, now, job_id, owner),
            )
            return cur.rowcount == 1

    def finish(self, job_id: int, owner: str, *, error: str = "", retry_at: float | None = None) -> None:
        params: tuple[Any, ...] = ()
        if retry_at is not None:
            status, sets, params = "queued", ", not_before = ?", (retry_at,)
        else:
            status, sets = ("failed" if error else "done"), ""
        with self._write() as cur:
            cur.execute(
                "UPDATE jobs SET status = ?, last_error = ?, lease_owner = '', lease_until = 0, "
                f"updated_at = ?{sets} WHERE id = ? AND lease_owner = ? AND status = 'leased'",
                (status, error, self._clock(), *params, job_id, owner),
            )
            if cur.rowcount != 1:
                raise Conflict(f"job {job_id} is not leased by {owner}")

    def jobs(self, address: str | None = None) -> list[Job]:
        where, params = ("WHERE address = ?", (address,)) if address is not None else ("", ())
        with self._read() as cur:
            rows = cur.execute(f"SELECT {_JOB_COLS} FROM jobs {where} ORDER BY id", params).fetchall()
        return [_job(r) for r in rows]

    # --- events -------------------------------------------------------------------------------------------
    def _event(self, cur: Cursor, address: str, kind: str, detail: str, at: float) -> None:
        cur.execute(
            "INSERT INTO events (at, address, kind, detail) VALUES (?, ?, ?, ?)", (at, address, kind, detail)
        )

    def record_event(self, address: str, kind: str, detail: str = "") -> None:
        with self._write() as cur:
            self._event(cur, address, kind, detail, self._clock())

    def events(self, address: str | None = None, limit: int = 100, *, kind: str | None = None) -> list[Event]:
        where, params = ("WHERE address = ?", [address]) if address is not None else ("", [])
        if kind is not None:
            where, params = (f"{where} AND kind = ?" if where else "WHERE kind = ?"), [*params, kind]
        with self._read() as cur:
            rows = cur.execute(
                f"SELECT {_EVENT_COLS} FROM events {where} ORDER BY id DESC LIMIT ?", (*params, limit)
            ).fetchall()
        return [Event(id=int(r[0]), at=r[1], address=r[2], kind=r[3], detail=r[4]) for r in rows]

    # --- message log --------------------------------------------------------------------------------------
    def log_messages(self, records: list[MessageRecord]) -> None:
        if not records:
            return
        now = self._clock()
        rows = [(*(getattr(r, f) for f in _MSG_FIELDS[:-1]), r.at or now) for r in records]
        with self._write() as cur:
            cur.executemany(
                f"INSERT INTO message_log ({', '.join(_MSG_FIELDS)}) "
                f"VALUES ({', '.join('?' for _ in _MSG_FIELDS)})",
                rows,
            )

    def message_log(self, recipient: str | None = None, limit: int = 1000) -> list[MessageRecord]:
        where, params = ("WHERE recipient = ?", [recipient]) if recipient is not None else ("", [])
        with self._read() as cur:
            rows = cur.execute(
                f"SELECT {', '.join(_MSG_FIELDS)} FROM message_log {where} ORDER BY id DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        out = []
        for r in rows:
            values = dict(zip(_MSG_FIELDS, r, strict=True))
            values["from_legacy"] = bool(values["from_legacy"])
            out.append(MessageRecord(**values))
        return out

    # --- copier watermarks --------------------------------------------------------------------------------
    def folder_marks(self, address: str) -> dict[str, FolderMark]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT folder, uidvalidity, last_uid, messages FROM folder_marks WHERE address = ? "
                "ORDER BY folder",
                (address,),
            ).fetchall()
        return {r[0]: FolderMark(folder=r[0], uidvalidity=r[1], last_uid=r[2], messages=r[3]) for r in rows}

    def set_folder_mark(self, address: str, mark: FolderMark) -> None:
        with self._write() as cur:
            self._require(cur, address)
            cur.execute(
                "INSERT INTO folder_marks (address, folder, uidvalidity, last_uid, messages, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (address, folder) DO UPDATE SET "
                "uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid, "
                "messages = excluded.messages, updated_at = excluded.updated_at",
                (address, mark.folder, mark.uidvalidity, mark.last_uid, mark.messages, self._clock()),
            )

    def clear_folder_marks(self, address: str, folder: str | None = None) -> None:
        with self._write() as cur:
            if folder is None:
                cur.execute("DELETE FROM folder_marks WHERE address = ?", (address,))
            else:
                cur.execute("DELETE FROM folder_marks WHERE address = ? AND folder = ?", (address, folder))

    # --- aliases (schema v2) ------------------------------------------------------------------------------
    def set_alias(self, alias: str, targets: list[str]) -> Alias:
        if not targets:
            raise ValueError(f"alias {alias} needs at least one target")
        now = self._clock()
        with self._write() as cur:
            cur.execute(
                "INSERT INTO aliases (alias, targets, created_at, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (alias) DO UPDATE SET targets = excluded.targets, updated_at = excluded.updated_at",
                (alias, ",".join(targets), now, now),
            )
            row = cur.execute(
                "SELECT alias, targets, created_at, updated_at FROM aliases WHERE alias = ?", (alias,)
            ).fetchone()
        assert row is not None
        return _alias(row)

    def remove_alias(self, alias: str) -> bool:
        with self._write() as cur:
            cur.execute("DELETE FROM aliases WHERE alias = ?", (alias,))
            return cur.rowcount == 1

    def alias_targets(self, alias: str) -> tuple[str, ...] | None:
        with self._read() as cur:
            row = cur.execute("SELECT targets FROM aliases WHERE alias = ?", (alias,)).fetchone()
        return None if row is None else tuple(t for t in str(row[0]).split(",") if t)

    def aliases(self) -> list[Alias]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT alias, targets, created_at, updated_at FROM aliases ORDER BY alias"
            ).fetchall()
        return [_alias(r) for r in rows]

    def alias_entries(self) -> list[tuple[str, str]]:
        # two queries whatever the number of imported users (the base class reads each user's addresses apart)
        with self._read() as cur:
            aliases = cur.execute("SELECT alias, targets FROM aliases").fetchall()
            extra = cur.execute(
                "SELECT x.address, u.address FROM imported_addresses x JOIN imported_users u ON u.login = x.login"
            ).fetchall()
        out = {str(a).lower(): ", ".join(x for x in str(t).split(",") if x) for a, t in aliases}
        for address, owner in extra:
            out.setdefault(str(address).lower(), str(owner))
        return sorted(out.items())

    # --- the login map (schema v5) -------------------------------------------------------------------------
    def import_users(self, users: list[ImportedUser]) -> int:
        now = self._clock()
        with self._write() as cur:
            for u in users:
                owner = cur.execute(
                    "SELECT login FROM imported_users WHERE address = ? AND login <> ?", (u.address, u.login)
                ).fetchone()
                if owner is not None:
                    raise Conflict(f"address {u.address} is already imported for login {owner[0]}")
                extra_of = cur.execute(
                    "SELECT login FROM imported_addresses WHERE (address = ? OR address = ?) AND login <> ?",
                    (u.login, u.address, u.login),
                ).fetchone()
                if extra_of is not None:
                    raise Conflict(f"login or address of {u.login} is an extra address of login {extra_of[0]}")
                cur.execute(
                    "INSERT INTO imported_users (login, address, imported_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (login) DO UPDATE SET address = excluded.address, imported_at = excluded.imported_at",
                    (u.login, u.address, now),
                )
                cur.execute("DELETE FROM imported_addresses WHERE login = ?", (u.login,))
                for extra in u.addresses:
                    taken = cur.execute(
                        "SELECT login FROM imported_addresses WHERE address = ? UNION "
                        "SELECT login FROM imported_users WHERE (address = ? OR login = ?) AND login <> ?",
                        (extra, extra, extra, u.login),
                    ).fetchone()
                    if taken is not None:
                        raise Conflict(f"address {extra} is already imported for login {taken[0]}")
                    cur.execute("INSERT INTO imported_addresses (address, login) VALUES (?, ?)", (extra, u.login))
        return len(users)

    def _imported(self, cur: Cursor, login: str, address: str) -> ImportedUser:
        extras = cur.execute(
            "SELECT address FROM imported_addresses WHERE login = ? ORDER BY address", (login,)
        ).fetchall()
        return ImportedUser(login=login, address=address, addresses=tuple(r[0] for r in extras))

    def imported_users(self) -> list[ImportedUser]:
        with self._read() as cur:
            rows = cur.execute("SELECT login, address FROM imported_users ORDER BY login").fetchall()
            return [self._imported(cur, r[0], r[1]) for r in rows]

    def find_imported(self, key: str) -> ImportedUser | None:
        with self._read() as cur:
            row = cur.execute(
                "SELECT login, address FROM imported_users WHERE login = ? OR address = ? UNION "
                "SELECT u.login, u.address FROM imported_addresses x JOIN imported_users u ON u.login = x.login "
                "WHERE x.address = ?",
                (key, key, key),
            ).fetchall()
            if len(row) != 1:
                return None  # none, or (an inconsistent import) more than one: no mapping
            return self._imported(cur, row[0][0], row[0][1])

    # --- reporting ----------------------------------------------------------------------------------------
    def message_log_since(self, since: float = 0.0) -> list[MessageRecord]:
        with self._read() as cur:
            rows = cur.execute(
                f"SELECT {', '.join(_MSG_FIELDS)} FROM message_log WHERE at >= ? ORDER BY at, id", (since,)
            ).fetchall()
        # positional, in _MSG_FIELDS order (test_store checks every field): `autoport report` reads every row,
        # and a dict of keyword arguments per row cost more than the query
        return [
            MessageRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], bool(r[11]), r[12])
            for r in rows
        ]

    # --- inventory and exclusions (schema v3) -------------------------------------------------------------
    def set_inventory(
        self, source: str, kind: str, names: dict[str, str] | list[str]
    ) -> InventoryChange:
        wanted = dict(names) if isinstance(names, dict) else {n: "" for n in names}
        now = self._clock()
        with self._write() as cur:
            have = {
                r[0]
                for r in cur.execute(
                    "SELECT name FROM inventory WHERE source = ? AND kind = ?" + self.for_update, (source, kind)
                ).fetchall()
            }
            gone = sorted(have - set(wanted))
            for name in gone:
                cur.execute("DELETE FROM inventory WHERE source = ? AND kind = ? AND name = ?", (source, kind, name))
            for name, detail in wanted.items():
                cur.execute(
                    "INSERT INTO inventory (kind, name, source, detail, first_seen, last_seen) "
                    "VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (kind, name, source) DO UPDATE SET detail = excluded.detail, "
                    "last_seen = excluded.last_seen",
                    (kind, name, source, detail, now, now),
                )
        added = tuple(sorted(set(wanted) - have))
        return InventoryChange(added=added, removed=tuple(gone), kept=len(wanted) - len(added))

    def inventory(self, kind: str | None = None) -> list[InventoryEntry]:
        where, params = ("WHERE kind = ?", (kind,)) if kind is not None else ("", ())
        with self._read() as cur:
            rows = cur.execute(
                f"SELECT kind, name, source, first_seen, last_seen, detail FROM inventory {where} "
                "ORDER BY kind, name, source",
                params,
            ).fetchall()
        return [InventoryEntry(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    def set_exclusion(self, address: str, reason: str) -> Exclusion:
        if not reason.strip():
            raise ValueError(f"excluding {address} needs a reason")
        with self._write() as cur:
            cur.execute(
                "INSERT INTO exclusions (address, reason, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (address) DO UPDATE SET reason = excluded.reason",
                (address, reason, self._clock()),
            )
            row = cur.execute(
                "SELECT address, reason, created_at FROM exclusions WHERE address = ?", (address,)
            ).fetchone()
        assert row is not None
        return Exclusion(row[0], row[1], row[2])

    def remove_exclusion(self, address: str) -> bool:
        with self._write() as cur:
            cur.execute("DELETE FROM exclusions WHERE address = ?", (address,))
            return cur.rowcount == 1

    def exclusions(self) -> list[Exclusion]:
        with self._read() as cur:
            rows = cur.execute("SELECT address, reason, created_at FROM exclusions ORDER BY address").fetchall()
        return [Exclusion(r[0], r[1], r[2]) for r in rows]

    # --- cutover handshake and blocked sweeps (schema v4) -----------------------------------------------------
    def node_heartbeat(self, node: str) -> None:
        now = self._clock()
        with self._write() as cur:
            cur.execute(
                "INSERT INTO nodes (node, started_at, heartbeat_at) VALUES (?, ?, ?) "
                "ON CONFLICT (node) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (node, now, now),
            )

    def live_nodes(self, within: float) -> list[str]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT node FROM nodes WHERE heartbeat_at >= ? ORDER BY node", (self._clock() - within,)
            ).fetchall()
        return [str(r[0]) for r in rows]

    def request_kick(self, address: str, logins: list[str], kind: str = "kick") -> Kick:
        if kind not in KICK_KINDS:
            raise ValueError(f"kick kind must be one of {', '.join(KICK_KINDS)}, not {kind!r}")
        now = self._clock()
        names = sorted(set(logins) | ({address} if kind == "kick" else set()))
        with self._write() as cur:
            row = cur.execute(
                "INSERT INTO kicks (address, logins, requested_at, kind) VALUES (?, ?, ?, ?) RETURNING id",
                (address, "\n".join(names), now, kind),
            ).fetchone()
        assert row is not None
        return Kick(id=int(row[0]), address=address, logins=tuple(names), requested_at=now, kind=kind)

    def pending_kicks(self, node: str, since: float) -> list[Kick]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT id, address, logins, requested_at, kind FROM kicks k WHERE requested_at >= ? AND NOT EXISTS "
                "(SELECT 1 FROM kick_acks a WHERE a.kick_id = k.id AND a.node = ?) ORDER BY id",
                (since, node),
            ).fetchall()
        return [Kick(int(r[0]), r[1], tuple(x for x in str(r[2]).split("\n") if x), r[3], str(r[4])) for r in rows]

    def ack_kick(self, kick_id: int, node: str, detail: str = "") -> None:
        with self._write() as cur:
            cur.execute(
                "INSERT INTO kick_acks (kick_id, node, acked_at, detail) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (kick_id, node) DO NOTHING",
                (kick_id, node, self._clock(), detail),
            )

    def kick_acks(self, kick_id: int) -> dict[str, str]:
        with self._read() as cur:
            rows = cur.execute("SELECT node, detail FROM kick_acks WHERE kick_id = ?", (kick_id,)).fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def set_sweep_block(self, address: str, reason: str) -> None:
        with self._write() as cur:
            self._require(cur, address)
            cur.execute(
                "INSERT INTO sweep_blocks (address, reason, since) VALUES (?, ?, ?) "
                "ON CONFLICT (address) DO UPDATE SET reason = excluded.reason",
                (address, reason, self._clock()),
            )

    def clear_sweep_block(self, address: str) -> None:
        with self._write() as cur:
            cur.execute("DELETE FROM sweep_blocks WHERE address = ?", (address,))

    def sweep_blocks(self) -> list[SweepBlock]:
        with self._read() as cur:
            rows = cur.execute("SELECT address, reason, since FROM sweep_blocks ORDER BY address").fetchall()
        return [SweepBlock(str(r[0]), str(r[1]), float(r[2])) for r in rows]


def _alias(row: Row) -> Alias:
    return Alias(
        alias=row[0], targets=tuple(t for t in str(row[1]).split(",") if t), created_at=row[2], updated_at=row[3]
    )


_INHERITED: list[Any] = []  # connections a forked child inherited: kept, never used, never finalised
_ALL: weakref.WeakSet[PerThread] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_ALL):
        pool._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class PerThread:
    """One driver connection per thread, all of them closable at once.

    Connections of threads that have ended are closed when the next connection is made, so a daemon whose
    worker threads come and go does not accumulate them.
    """

    def __init__(self, close: Callable[[Any], None]) -> None:
        self._close = close
        self._lock = threading.Lock()
        self._conns: dict[int, Any] = {}
        self.closed = False
        _ALL.add(self)

    def get(self) -> Any:
        return self._conns.get(threading.get_ident())

    def _forked(self) -> None:
        """In a forked child (the socketmap workers): the parent's connections are not ours to use or close
        (closing one would end the parent's session or checkpoint its WAL), so they stay referenced (never
        finalised) until the child exits; start afresh, with a lock no other thread can be holding."""
        _INHERITED.append(self._conns)
        self._conns = {}
        self._lock = threading.Lock()

    def put(self, conn: Any) -> None:
        ident = threading.get_ident()
        with self._lock:
            if self.closed:
                self._close(conn)
                raise StoreError("the store is closed")
            alive = {t.ident for t in threading.enumerate()}
            stale = [i for i in self._conns if i not in alive]
            for i in stale:
                self._safe_close(self._conns.pop(i))
            self._conns[ident] = conn

    def drop(self) -> None:
        """Forget (and close) the calling thread's connection, e.g. after the server went away."""
        with self._lock:
            conn = self._conns.pop(threading.get_ident(), None)
        if conn is not None:
            self._safe_close(conn)

    def close_all(self) -> None:
        with self._lock:
            self.closed = True
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            self._safe_close(conn)

    def _safe_close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            self._close(conn)
