"""Helpers for the target-stack tests: a short lab directory and a hand-made state store with Dovecot's views.

The store here is deliberately not sidecar.store: it holds exactly the three views of the store <-> Dovecot
contract (dovecot_passdb, dovecot_deny, dovecot_userdb), so these tests check the Dovecot side of the
contract on its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

from harness.labs import make_lab_dir
from sidecar.lab import target

SCHEMA = """
CREATE TABLE accounts (address TEXT PRIMARY KEY, state TEXT NOT NULL, password_hash TEXT);
CREATE TABLE logins (login TEXT PRIMARY KEY, address TEXT NOT NULL REFERENCES accounts(address));
CREATE VIEW dovecot_passdb AS
    SELECT l.login AS login, a.address AS "user", a.password_hash AS password
    FROM logins l JOIN accounts a ON a.address = l.address
    WHERE a.state = 'migrated' AND a.password_hash IS NOT NULL;
CREATE VIEW dovecot_deny AS
    SELECT l.login AS login, a.address AS "user"
    FROM logins l JOIN accounts a ON a.address = l.address WHERE a.state = 'migrated';
CREATE VIEW dovecot_userdb AS
    SELECT l.login AS login, a.address AS "user" FROM logins l JOIN accounts a ON a.address = l.address;
"""


def lab_dir() -> Path:
    """A fresh, short directory under /tmp (UNIX socket paths stay well under 108 bytes)."""
    d = make_lab_dir("ap-tgt-")
    return d


@contextlib.contextmanager
def running_target(**kwargs: object) -> Iterator[tuple[Path, target.TargetStack]]:
    """A target stack (no sidecar unless asked) in a fresh lab directory; stopped and removed afterwards."""
    d = lab_dir()
    store = d / "state.db"
    make_store(store, kwargs.pop("accounts", []))  # type: ignore[arg-type]
    kwargs.setdefault("sidecar", False)
    kwargs.setdefault("domains", ["example.test"])
    kwargs.setdefault("legacy", {"host": "127.0.0.2", "smtp_port": 2525})
    try:
        stack = target.start_target(d, store_url=f"sqlite:///{store}", **kwargs)  # type: ignore[arg-type]
        yield d, stack
    finally:
        target.stop_target(d)
        shutil.rmtree(d, ignore_errors=True)


def dovecot_hash(password: str, scheme: str = "ARGON2ID") -> str:
    """A Dovecot password hash made by `doveadm pw`, the password given on stdin (never argv)."""
    p = subprocess.run(
        ["doveadm", "pw", "-s", scheme],
        input=f"{password}\n{password}\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return p.stdout.strip()


def make_store(path: Path, accounts: Iterable[tuple[str, str, str | None]]) -> None:
    """A SQLite store with the Dovecot views: accounts are (address, state, hash); login = address.

    Readable by the dovecot group (Dovecot's auth workers run as the dovecot user), as the real store is.
    """
    db = sqlite3.connect(path)
    try:
        db.executescript(SCHEMA)
        for address, state, pw_hash in accounts:
            db.execute("INSERT INTO accounts VALUES (?, ?, ?)", (address, state, pw_hash))
            db.execute("INSERT INTO logins VALUES (?, ?)", (address.lower(), address))
        db.commit()
    finally:
        db.close()
    shutil.chown(path, group="dovecot")
    os.chmod(path, 0o640)
