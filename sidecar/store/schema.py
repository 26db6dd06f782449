"""Versioned schema migrations for both store backends.

MIGRATIONS is an ordered list of versions 1..N; each carries its SQL for every dialect ("sqlite",
"postgresql"). A store records the versions it applied in the schema_version table. Store.upgrade() applies
the pending ones in order, each in its own transaction together with its schema_version row, so a failed
migration leaves the store at the previous version; Store.init() is the same starting from an empty store.
Migrations update the database in place (ALTER / CREATE), never by replacing the file: Dovecot keeps a
SQLite store open.

More (the reasons and limits behind this module): docs/modules.md, sidecar/store/schema.py.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from sidecar.states import State

Dialect = Literal["sqlite", "postgresql"]
DIALECTS: tuple[Dialect, ...] = ("sqlite", "postgresql")

# Column types per dialect; the v1 templates below use these names.
_TYPES: dict[Dialect, dict[str, str]] = {
    "sqlite": {
        "ID": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "TIME": "REAL",
        "INT": "INTEGER",
        "TEXT": "TEXT",
        "BOOL": "INTEGER",
        "FALSE": "0",
    },
    "postgresql": {
        "ID": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "TIME": "DOUBLE PRECISION",
        "INT": "BIGINT",
        "TEXT": "TEXT",
        "BOOL": "BOOLEAN",
        "FALSE": "FALSE",
    },
}

VIEWS = ("dovecot_passdb", "dovecot_deny", "dovecot_userdb")

# Created (IF NOT EXISTS) inside the transaction of every migration, before the version check.
VERSION_TABLE: dict[Dialect, str] = {
    d: (
        "CREATE TABLE IF NOT EXISTS schema_version ("
        f"version {_TYPES[d]['INT']} PRIMARY KEY, applied_at {_TYPES[d]['TIME']} NOT NULL, "
        "description TEXT NOT NULL)"
    )
    for d in DIALECTS
}


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sql: dict[Dialect, tuple[str, ...]]

    def statements(self, dialect: Dialect) -> tuple[str, ...]:
        return self.sql[dialect]


def _both(*templates: str) -> dict[Dialect, tuple[str, ...]]:
    """The same DDL for both dialects, differing only in the {TYPE} names of _TYPES."""
    return {d: tuple(t.format(**_TYPES[d]) for t in templates) for d in DIALECTS}


_STATES = ", ".join(f"'{s.value}'" for s in State)

_V1 = _both(
    f"""CREATE TABLE accounts (
        address TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ({_STATES})),
        password_hash TEXT,
        created_at {{TIME}} NOT NULL,
        updated_at {{TIME}} NOT NULL,
        last_login_at {{TIME}},
        migrated_at {{TIME}},
        messages_total {{INT}} NOT NULL DEFAULT 0,
        messages_copied {{INT}} NOT NULL DEFAULT 0,
        bytes_copied {{INT}} NOT NULL DEFAULT 0,
        attempts {{INT}} NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX accounts_state ON accounts (state)",
    """CREATE TABLE logins (
        login TEXT PRIMARY KEY,
        address TEXT NOT NULL REFERENCES accounts (address) ON DELETE CASCADE
    )""",
    "CREATE INDEX logins_address ON logins (address)",
    """CREATE TABLE jobs (
        id {ID},
        address TEXT NOT NULL REFERENCES accounts (address) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('queued', 'leased', 'done', 'failed')),
        attempts {INT} NOT NULL DEFAULT 0,
        not_before {TIME} NOT NULL DEFAULT 0,
        lease_owner TEXT NOT NULL DEFAULT '',
        lease_until {TIME} NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        created_at {TIME} NOT NULL,
        updated_at {TIME} NOT NULL
    )""",
    # at most one open job per account and kind: enqueue() is idempotent through this index
    "CREATE UNIQUE INDEX jobs_one_open ON jobs (address, kind) WHERE status IN ('queued', 'leased')",
    "CREATE INDEX jobs_runnable ON jobs (status, not_before)",
    "CREATE INDEX jobs_address ON jobs (address)",
    """CREATE TABLE events (
        id {ID},
        at {TIME} NOT NULL,
        address TEXT NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX events_address ON events (address, id)",
    """CREATE TABLE message_log (
        id {ID},
        at {TIME} NOT NULL,
        queue_id TEXT NOT NULL,
        recipient TEXT NOT NULL,
        sender TEXT NOT NULL,
        message_id TEXT NOT NULL,
        route TEXT NOT NULL,
        size {INT} NOT NULL,
        auto_submitted TEXT NOT NULL DEFAULT '',
        precedence TEXT NOT NULL DEFAULT '',
        list_id TEXT NOT NULL DEFAULT '',
        client_addr TEXT NOT NULL DEFAULT '',
        auth_user TEXT NOT NULL DEFAULT '',
        from_legacy {BOOL} NOT NULL DEFAULT {FALSE}
    )""",
    "CREATE INDEX message_log_recipient ON message_log (recipient, id)",
    "CREATE INDEX message_log_at ON message_log (at)",
    """CREATE TABLE folder_marks (
        address TEXT NOT NULL REFERENCES accounts (address) ON DELETE CASCADE,
        folder TEXT NOT NULL,
        uidvalidity {INT} NOT NULL,
        last_uid {INT} NOT NULL,
        messages {INT} NOT NULL DEFAULT 0,
        updated_at {TIME} NOT NULL,
        PRIMARY KEY (address, folder)
    )""",
    """CREATE VIEW dovecot_passdb AS
        SELECT l.login AS login, a.address AS "user", a.password_hash AS password
        FROM logins l JOIN accounts a ON a.address = l.address
        WHERE a.state = 'migrated' AND a.password_hash IS NOT NULL AND a.password_hash <> ''""",
    """CREATE VIEW dovecot_deny AS
        SELECT l.login AS login, a.address AS "user"
        FROM logins l JOIN accounts a ON a.address = l.address
        WHERE a.state = 'migrated'""",
    """CREATE VIEW dovecot_userdb AS
        SELECT l.login AS login, l.address AS "user" FROM logins l""",
)

# v2: aliases served to Postfix as virtual_alias_maps (socketmap map "virtual"); dovecot_deny keeps only migrated
# accounts WITH a hash. PostgreSQL replaces the view in place (CREATE OR REPLACE keeps the GRANT to Dovecot's
# role, which `store upgrade` does not renew); SQLite has no OR REPLACE for views.
_DENY_V2 = """dovecot_deny AS
        SELECT l.login AS login, a.address AS "user"
        FROM logins l JOIN accounts a ON a.address = l.address
        WHERE a.state = 'migrated' AND a.password_hash IS NOT NULL AND a.password_hash <> ''"""
_ALIASES_V2 = """CREATE TABLE aliases (
        alias TEXT PRIMARY KEY,
        targets TEXT NOT NULL,
        created_at {TIME} NOT NULL,
        updated_at {TIME} NOT NULL
    )"""
_V2: dict[Dialect, tuple[str, ...]] = {
    "sqlite": (_ALIASES_V2.format(**_TYPES["sqlite"]), "DROP VIEW dovecot_deny", f"CREATE VIEW {_DENY_V2}"),
    "postgresql": (_ALIASES_V2.format(**_TYPES["postgresql"]), f"CREATE OR REPLACE VIEW {_DENY_V2}"),
}

# v3: the legacy server's own account list (`autoport inventory`), so "ready to retire" covers accounts that never
# logged in nor received mail, and accounts the administrator leaves behind on purpose (`autoport exclude`).
# inventory: one row per (kind, name, source); kind "account" (name = address) or "shared-folder" (name = the
# legacy folder name, for the report); source "legacy", "ldap", "file:/PATH". exclusions: one row per address.
_V3 = _both(
    """CREATE TABLE inventory (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        source TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        first_seen {TIME} NOT NULL,
        last_seen {TIME} NOT NULL,
        PRIMARY KEY (kind, name, source)
    )""",
    """CREATE TABLE exclusions (
        address TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        created_at {TIME} NOT NULL
    )""",
)

# v4: the cutover handshake between front-end nodes and sweeps that cannot run (sidecar.migration.cutover).
#   nodes        every sidecar records itself (node id, heartbeat); a node is live while its heartbeat is fresh
#   kicks        "close every proxied session of this account and clear the route cache" requests, one per cutover
#                round; kick_acks: which node carried a request out, and when
#   sweep_blocks accounts whose trailing sweep cannot run (no credentials, legacy refuses), with the reason
_V4 = _both(
    """CREATE TABLE nodes (
        node TEXT PRIMARY KEY,
        started_at {TIME} NOT NULL,
        heartbeat_at {TIME} NOT NULL
    )""",
    """CREATE TABLE kicks (
        id {ID},
        address TEXT NOT NULL,
        logins TEXT NOT NULL DEFAULT '',
        requested_at {TIME} NOT NULL
    )""",
    "CREATE INDEX kicks_requested ON kicks (requested_at)",
    """CREATE TABLE kick_acks (
        kick_id {INT} NOT NULL REFERENCES kicks (id) ON DELETE CASCADE,
        node TEXT NOT NULL,
        acked_at {TIME} NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (kick_id, node)
    )""",
    """CREATE TABLE sweep_blocks (
        address TEXT PRIMARY KEY REFERENCES accounts (address) ON DELETE CASCADE,
        reason TEXT NOT NULL,
        since {TIME} NOT NULL
    )""",
)

# v5: the login map of `autoport import-users`, in its own tables (the inventory reads them too):
# imported_users (login -> account address, the legacy login name) and imported_addresses (extra addresses of
# the same mailbox). The dovecot_* views now also answer for imported logins and extra addresses, so a migrated
# user logs in natively as `jsmith` (Dovecot lower-cases %u; logins are stored folded). Imported rows may name
# an account that does not exist yet: the views join accounts, so they answer once it does.
_IMPORTED_V5 = (
    """CREATE TABLE imported_users (
        login TEXT PRIMARY KEY,
        address TEXT NOT NULL UNIQUE,
        imported_at {TIME} NOT NULL
    )""",
    """CREATE TABLE imported_addresses (
        address TEXT PRIMARY KEY,
        login TEXT NOT NULL REFERENCES imported_users (login) ON DELETE CASCADE
    )""",
    "CREATE INDEX imported_addresses_login ON imported_addresses (login)",
)
_NAMES_V5 = """(SELECT login, address FROM logins
            UNION SELECT login, address FROM imported_users
            UNION SELECT x.address AS login, u.address AS address
                FROM imported_addresses x JOIN imported_users u ON u.login = x.login) n"""
_VIEWS_V5 = {
    "dovecot_passdb": f"""dovecot_passdb AS
        SELECT n.login AS login, a.address AS "user", a.password_hash AS password
        FROM {_NAMES_V5} JOIN accounts a ON a.address = n.address
        WHERE a.state = 'migrated' AND a.password_hash IS NOT NULL AND a.password_hash <> ''""",
    "dovecot_deny": f"""dovecot_deny AS
        SELECT n.login AS login, a.address AS "user"
        FROM {_NAMES_V5} JOIN accounts a ON a.address = n.address
        WHERE a.state = 'migrated' AND a.password_hash IS NOT NULL AND a.password_hash <> ''""",
    "dovecot_userdb": f"""dovecot_userdb AS
        SELECT n.login AS login, a.address AS "user"
        FROM {_NAMES_V5} JOIN accounts a ON a.address = n.address""",
}
_V5: dict[Dialect, tuple[str, ...]] = {
    "sqlite": (
        *(t.format(**_TYPES["sqlite"]) for t in _IMPORTED_V5),
        *(f"DROP VIEW {name}" for name in _VIEWS_V5),
        *(f"CREATE VIEW {body}" for body in _VIEWS_V5.values()),
    ),
    "postgresql": (
        *(t.format(**_TYPES["postgresql"]) for t in _IMPORTED_V5),
        *(f"CREATE OR REPLACE VIEW {body}" for body in _VIEWS_V5.values()),
    ),
}

# v6: a kick request has a kind: "kick" (the cutover's: close proxied sessions, clear the route cache; every
# request before v6) or "flush" (forget the account's entries in Dovecot's auth cache: its password, logins or
# state changed; sidecar.migration.cutover.flush_everywhere).
_V6 = _both("ALTER TABLE kicks ADD COLUMN kind TEXT NOT NULL DEFAULT 'kick'")

MIGRATIONS: list[Migration] = [
    Migration(1, "accounts, logins, jobs, events, message log, folder marks, dovecot views", _V1),
    Migration(2, "aliases; dovecot_deny lists only migrated accounts with a hash", _V2),
    Migration(3, "inventory of legacy accounts and shared folders; exclusions", _V3),
    Migration(4, "cutover handshake between nodes (nodes, kicks, kick_acks); sweeps that cannot run", _V4),
    Migration(5, "imported users and their extra addresses (login map); dovecot views answer for them", _V5),
    Migration(6, "kick requests have a kind: kick (cutover) or flush (Dovecot's auth cache)", _V6),
]


def latest(migrations: list[Migration] | None = None) -> int:
    """The newest schema version this code knows."""
    ms = MIGRATIONS if migrations is None else migrations
    return ms[-1].version if ms else 0


def check_order(migrations: list[Migration]) -> None:
    """Versions must be 1..N without gaps, each with SQL for every dialect."""
    for i, m in enumerate(migrations, start=1):
        if m.version != i:
            raise ValueError(f"schema migration #{i} has version {m.version}, expected {i}")
        missing = [d for d in DIALECTS if d not in m.sql]
        if missing:
            raise ValueError(f"schema migration {m.version} has no SQL for {', '.join(missing)}")


def pending(current: int, migrations: list[Migration] | None = None) -> list[Migration]:
    """Migrations newer than `current`, in order."""
    ms = MIGRATIONS if migrations is None else migrations
    check_order(ms)
    return [m for m in ms if m.version > current]


check_order(MIGRATIONS)
