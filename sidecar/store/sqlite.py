"""SQLite state store: one host, shared with Dovecot's sqlite driver.

Concurrency: one connection per thread, WAL mode (readers never block the writer), a busy timeout, and every
write in BEGIN IMMEDIATE, which takes SQLite's single write lock up front, so a read-check-write sequence
(transition, lease) cannot interleave with another writer in this or any other process.

More (the reasons and limits behind this module): docs/modules.md, sidecar/store/sqlite.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import logging
import os
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

from sidecar.store.base import StoreError, StoreUnavailable
from sidecar.store.sql import Clock, Cursor, PerThread, Row, SqlStore

log = logging.getLogger(__name__)

FILE_MODE = 0o640
DIR_MODE = 0o2750
SQLITE_FCNTL_PERSIST_WAL = 10
_persist_warned = False


def _persist_wal(conn: sqlite3.Connection, path: str) -> bool:
    """Turn on SQLITE_FCNTL_PERSIST_WAL for this connection (Python's sqlite3 has no file_control).

    Only when the sqlite3 module uses the shared libsqlite3 already loaded in this process, and the handle
    found in the connection object names our file: otherwise nothing is called and False is returned.
    """
    global _persist_warned
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            if "libsqlite3.so" not in f.read():
                raise OSError("the sqlite3 module does not use the shared libsqlite3")
        lib = ctypes.CDLL("libsqlite3.so.0")
        lib.sqlite3_db_filename.restype = ctypes.c_char_p
        lib.sqlite3_db_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.sqlite3_file_control.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
        # CPython's connection object: PyObject_HEAD, then the sqlite3* handle
        handle = ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value
        name = lib.sqlite3_db_filename(handle, b"main") if handle else None
        if not name or os.path.realpath(name.decode("utf-8", "replace")) != os.path.realpath(path):
            raise OSError("cannot find the connection's sqlite3 handle")
        on = ctypes.c_int(1)
        if lib.sqlite3_file_control(handle, b"main", SQLITE_FCNTL_PERSIST_WAL, ctypes.byref(on)) != 0:
            raise OSError("sqlite3_file_control refused SQLITE_FCNTL_PERSIST_WAL")
        return True
    except (OSError, AttributeError, ValueError) as e:
        if not _persist_warned:
            _persist_warned = True
            log.warning("sqlite store %s: cannot keep -wal/-shm (%s): Dovecot cannot read the store while no "
                        "autoport process has it open", path, e)
        return False

# Primary result codes meaning "cannot answer now" (https://sqlite.org/rescode.html).
_UNAVAILABLE_CODES = {
    3,  # SQLITE_PERM
    5,  # SQLITE_BUSY
    6,  # SQLITE_LOCKED
    7,  # SQLITE_NOMEM
    8,  # SQLITE_READONLY
    10,  # SQLITE_IOERR
    11,  # SQLITE_CORRUPT
    13,  # SQLITE_FULL
    14,  # SQLITE_CANTOPEN
    15,  # SQLITE_PROTOCOL
    26,  # SQLITE_NOTADB
}


def translate(e: sqlite3.Error, path: str) -> StoreError:
    """The store error for a driver error (SQLite messages never carry secrets)."""
    code = getattr(e, "sqlite_errorcode", None)
    message = f"sqlite store {path}: {e}"
    if code is not None and code & 0xFF in _UNAVAILABLE_CODES:
        return StoreUnavailable(message)
    if isinstance(e, sqlite3.OperationalError) and code is None:
        return StoreUnavailable(message)
    return StoreError(message)


class SqliteStore(SqlStore):
    dialect = "sqlite"

    def __init__(
        self,
        path: str,
        *,
        dovecot_group: str = "dovecot",
        busy_timeout: float = 10.0,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(clock=clock)
        if not os.path.isabs(path):
            raise ValueError(f"sqlite store path must be absolute, not {path!r}")
        self.path = path
        self.dovecot_group = dovecot_group
        self.busy_timeout = busy_timeout
        self._conns = PerThread(lambda c: c.close())
        self._permissions_checked = False

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    # --- connections ---------------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = self._conns.get()
        if conn is not None:
            return conn
        if self._conns.closed:
            raise StoreError("the store is closed")
        # mode=rw: never create the file here (init() does, with the right permissions)
        uri = "file:" + urllib.parse.quote(self.path) + "?mode=rw"
        conn = sqlite3.connect(
            uri, uri=True, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        _persist_wal(conn, self.path)
        self._conns.put(conn)
        if not self._permissions_checked:
            self._permissions_checked = True
            self._fix_permissions(quiet=True)
        return conn

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise translate(e, self.path) from None

    @contextlib.contextmanager
    def _tx(self, begin: str) -> Iterator[Cursor]:
        with self._errors():
            conn = self._conn()
            conn.execute(begin)
            try:
                yield Cursor(conn.cursor(), pyformat=False)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _write(self) -> contextlib.AbstractContextManager[Cursor]:
        return self._tx("BEGIN IMMEDIATE")

    def _read(self) -> contextlib.AbstractContextManager[Cursor]:
        return self._tx("BEGIN")

    def _select(self, sql: str, params: Sequence[Any]) -> list[Row]:
        try:  # not `with self._errors()`: this is routing's hot path, and a context manager costs as much
            return self._conn().execute(sql, tuple(params)).fetchall()  # autocommit: no BEGIN/COMMIT round
        except sqlite3.Error as e:
            raise translate(e, self.path) from None

    def _schema_lock(self, cur: Cursor) -> None:
        """BEGIN IMMEDIATE already holds the write lock."""

    def _table_exists(self, cur: Cursor, name: str) -> bool:
        row = cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
        return row is not None

    def close(self) -> None:
        self._conns.close_all()

    # --- schema -------------------------------------------------------------------------------------------
    def schema_version(self) -> int:
        if not os.path.exists(self.path):
            return 0  # never initialised; do not create the file here
        return super().schema_version()

    def init(self) -> int:
        self._create_files()
        with self._errors():
            mode = self._conn().execute("PRAGMA journal_mode = WAL").fetchone()
        if not mode or str(mode[0]).lower() != "wal":
            raise StoreUnavailable(f"sqlite store {self.path}: cannot switch to WAL mode (got {mode})")
        return super().init()

    def _after_init(self) -> None:
        self._fix_permissions(quiet=False)

    # --- files --------------------------------------------------------------------------------------------
    def _gid(self, *, quiet: bool) -> int | None:
        if not self.dovecot_group:
            return None
        try:
            return grp.getgrnam(self.dovecot_group).gr_gid
        except KeyError:
            if not quiet:
                log.warning("group %s does not exist: Dovecot cannot read %s", self.dovecot_group, self.path)
            return None

    def _create_files(self) -> None:
        gid = self._gid(quiet=False)
        directory = os.path.dirname(self.path)
        try:
            if not os.path.isdir(directory):
                os.makedirs(os.path.dirname(directory), exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(directory, DIR_MODE)
                    os.chmod(directory, DIR_MODE)  # mkdir's mode is filtered by the umask
                    if gid is not None:
                        os.chown(directory, -1, gid)
            with contextlib.suppress(FileExistsError):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
                try:
                    os.fchmod(fd, FILE_MODE)
                    if gid is not None:
                        os.fchown(fd, -1, gid)
                finally:
                    os.close(fd)
        except OSError as e:
            raise StoreUnavailable(f"sqlite store {self.path}: cannot create: {e.strerror}") from None

    def _fix_permissions(self, *, quiet: bool) -> None:
        """Database, -wal and -shm: mode 0640, group dovecot_group (where we own them or are root); the
        directory without group write (Dovecot could replace the files in a group-writable one)."""
        gid = self._gid(quiet=quiet)
        euid = os.geteuid()
        directory = os.path.dirname(self.path)
        with contextlib.suppress(OSError):
            st = os.stat(directory)
            if gid is not None and st.st_gid == gid and euid in (0, st.st_uid) and st.st_mode & stat.S_IWGRP:
                os.chmod(directory, stat.S_IMODE(st.st_mode) & ~stat.S_IWGRP)
        for name in (self.path, self.path + "-wal", self.path + "-shm"):
            try:
                st = os.stat(name)
            except FileNotFoundError:
                continue
            except OSError:
                continue
            if euid not in (0, st.st_uid):
                continue
            try:
                if gid is not None and st.st_gid != gid:
                    os.chown(name, -1, gid)
                if stat.S_IMODE(st.st_mode) != FILE_MODE:
                    os.chmod(name, FILE_MODE)
            except OSError as e:
                if not quiet:
                    log.warning("cannot set group/mode of %s: %s", name, e.strerror)


__all__ = ["DIR_MODE", "FILE_MODE", "SqliteStore"]
