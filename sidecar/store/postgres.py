"""PostgreSQL state store: several front-end nodes sharing one migration.

psycopg (the `postgres` extra) is imported when a PgStore is made, never at module import of the package.
One connection per thread (psycopg connections are not for concurrent use; psycopg_pool is not packaged
here), in autocommit mode with explicit READ COMMITTED transactions. Accounts are locked with
SELECT ... FOR UPDATE, a new account is inserted with ON CONFLICT DO NOTHING (two nodes creating the same
account: the loser looks again), queue rows are taken with FOR UPDATE SKIP LOCKED, and migrations are
serialised between nodes with a transaction-scoped advisory lock.

A connection the server dropped is discarded; the next call reconnects. Every psycopg OperationalError
(server down, connection lost, admin shutdown, deadlock) is StoreUnavailable. Messages name host, port and
database, never the password (the config refuses URLs with one; a password given anyway is redacted).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from sidecar.store import schema
from sidecar.store.base import StoreError, StoreUnavailable
from sidecar.store.sql import Clock, Cursor, PerThread, Row, SqlStore

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key for schema migrations: "autoport" in ASCII
SCHEMA_LOCK_KEY = 0x6175746F706F7274
REDACTED = "********"


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError(
            "a postgresql:// store needs psycopg: install autoport[postgres] (the postgres extra)"
        ) from None
    return psycopg


class PgStore(SqlStore):
    dialect = "postgresql"
    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(
        self,
        url: str,
        *,
        dovecot_role: str = "",
        connect_timeout: int = 5,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(clock=clock)
        self._psycopg = _import_psycopg()
        self._url = url
        self.dovecot_role = dovecot_role
        self.connect_timeout = connect_timeout
        try:
            info = self._psycopg.conninfo.conninfo_to_dict(url)
        except self._psycopg.Error:
            raise StoreError("postgresql store: the URL cannot be parsed") from None
        self._password: str = str(info.get("password") or "")
        host, port = info.get("host") or "localhost", info.get("port") or 5432
        self.where = f"{host}:{port}/{info.get('dbname') or ''}"
        self._conns = PerThread(lambda c: c.close())

    def __repr__(self) -> str:
        return f"PgStore({self.where!r})"

    # --- connections and errors ----------------------------------------------------------------------------
    def _conn(self) -> Any:
        conn = self._conns.get()
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            self._conns.drop()
        if self._conns.closed:
            raise StoreError("the store is closed")
        conn = self._psycopg.connect(
            self._url, autocommit=True, connect_timeout=self.connect_timeout, application_name="autoport"
        )
        self._conns.put(conn)
        return conn

    def _message(self, e: Exception) -> str:
        text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        if self._password:
            text = text.replace(self._password, REDACTED)
        return f"postgresql store {self.where}: {text or type(e).__name__}"

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except self._psycopg.OperationalError as e:
            conn = self._conns.get()
            if conn is not None and (conn.closed or conn.broken):
                self._conns.drop()
            raise StoreUnavailable(self._message(e)) from None
        except self._psycopg.Error as e:
            raise StoreError(self._message(e)) from None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Cursor]:
        with self._errors():
            conn = self._conn()
            with conn.transaction(), conn.cursor() as cur:
                yield Cursor(cur, pyformat=True)

    def _write(self) -> contextlib.AbstractContextManager[Cursor]:
        return self._tx()

    def _read(self) -> contextlib.AbstractContextManager[Cursor]:
        return self._tx()

    def _select(self, sql: str, params: Sequence[Any]) -> list[Row]:
        with self._errors():
            # an autocommit connection: one statement, no BEGIN/COMMIT round trips
            return [tuple(r) for r in self._conn().execute(sql.replace("?", "%s"), tuple(params)).fetchall()]

    def _schema_lock(self, cur: Cursor) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK_KEY,))

    def _table_exists(self, cur: Cursor, name: str) -> bool:
        row = cur.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()
        return bool(row and row[0])

    def close(self) -> None:
        self._conns.close_all()

    # --- grants -------------------------------------------------------------------------------------------
    def _after_init(self) -> None:
        """GRANT SELECT on the dovecot_* views to dovecot_role, when it is set and exists."""
        role = self.dovecot_role
        if not role:
            return
        sql = self._psycopg.sql
        with self._errors():
            conn = self._conn()
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                if cur.fetchone() is None:
                    log.warning("PostgreSQL role %s does not exist: no SELECT granted on the views", role)
                    return
                for view in schema.VIEWS:
                    cur.execute(
                        sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(view), sql.Identifier(role))
                    )
