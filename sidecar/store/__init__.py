"""The state store: open_store() picks the backend from the URL.

    sqlite:////ABSOLUTE/PATH            SqliteStore (one host; Dovecot reads the same file)
    postgresql://user@host:port/db      PgStore (several nodes; psycopg, the `postgres` extra)

The store is not created here: call Store.init() once (`autoport store init`), which is idempotent and also
upgrades an older schema.
"""

from __future__ import annotations

from sidecar.store.base import Store


def sqlite_url_path(url: str) -> str:
    """The absolute file path of a sqlite:///PATH URL (sqlite:////var/x and sqlite:///var/x: /var/x)."""
    if not url.startswith("sqlite:///"):
        raise ValueError("not a sqlite:/// URL")
    return "/" + url[len("sqlite://") :].lstrip("/")


def open_store(url: str, *, dovecot_group: str = "dovecot", dovecot_role: str = "") -> Store:
    """A store for `url`; ValueError for an unknown scheme, StoreError when the driver is missing."""
    if url.startswith("sqlite:///"):
        from sidecar.store.sqlite import SqliteStore

        return SqliteStore(sqlite_url_path(url), dovecot_group=dovecot_group)
    if url.startswith(("postgresql://", "postgres://")):
        from sidecar.store.postgres import PgStore

        return PgStore(url, dovecot_role=dovecot_role)
    # only the scheme: the rest of the URL could carry a password
    raise ValueError(f"store URL must start with sqlite:/// or postgresql://, not {url.split(':', 1)[0]}:")


__all__ = ["Store", "open_store", "sqlite_url_path"]
