"""A store location for the tests that run on both backends: a SQLite file or a fresh PostgreSQL schema."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from typing import Any

from sidecar.store.base import Store
from sidecar.store.postgres import PgStore
from sidecar.store.sql import SqlStore
from sidecar.store.sqlite import SqliteStore


class Backend:
    """One empty store location (a SQLite file or a fresh PostgreSQL database) and the stores opened on it."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.stores: list[Store] = []

    def open(self, *, clock: Callable[[], float] | None = None, **kw: Any) -> SqlStore:
        extra: dict[str, Any] = {"clock": clock} if clock else {}
        store: SqlStore
        if self.kind == "sqlite":
            store = SqliteStore(
                self.url[len("sqlite://") :], dovecot_group=kw.get("dovecot_group", "dovecot"), **extra
            )
        else:
            store = PgStore(self.url, dovecot_role=kw.get("dovecot_role", ""), **extra)
        self.stores.append(store)
        return store

    def dovecot(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run a query on a connection of its own, as Dovecot's sql driver does."""
        if self.kind == "sqlite":
            with contextlib.closing(sqlite3.connect(self.url[len("sqlite://") :])) as conn:
                return conn.execute(query, params).fetchall()
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            return [tuple(r) for r in conn.execute(query.replace("?", "%s"), params).fetchall()]

    def has_table(self, name: str) -> bool:
        if self.kind == "sqlite":
            return bool(self.dovecot("SELECT 1 FROM sqlite_master WHERE name = ?", name))
        return bool(self.dovecot("SELECT to_regclass(?) IS NOT NULL", name)[0][0])

    def close(self) -> None:
        for s in self.stores:
            s.close()
