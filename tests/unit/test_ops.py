"""Operator commands on a real SQLite store: migrate (queueing), passwd, import-hashes, alias; the virtual map;
the first login of an account migrated in bulk (no hash yet)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, cast

import pytest
from harness.cli import autoport, write_config

from sidecar import config as config_mod
from sidecar.auth.passwords import hash_password, verify_password
from sidecar.auth.policy import AuthPolicy
from sidecar.auth.routing import RoutingPolicy, Status
from sidecar.legacy.verify import LegacyAuthError
from sidecar.ops import actions as ops
from sidecar.states import State
from sidecar.store import open_store
from sidecar.store.base import Store
from sidecar.wire.authproto import FAIL, OK, Request

ADMIN = {"admin_user": "master", "admin_password": "admin-secret-pw", "admin_mode": "master"}


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    path = write_config(tmp_path, **ADMIN)
    p = autoport(path, "store", "init")
    assert p.returncode == 0, p.stderr
    return path


@pytest.fixture
def store(cfg_path: Path) -> Store:
    return open_store(config_mod.load(cfg_path).store.url)


def password_hash(cfg_path: Path, address: str) -> str | None:
    db = config_mod.load(cfg_path).store.url[len("sqlite://") :]
    with sqlite3.connect(db) as c:
        row = c.execute("SELECT password_hash FROM accounts WHERE address = ?", (address,)).fetchone()
    return None if row is None else cast(str | None, row[0])


# --- migrate ---------------------------------------------------------------------------------------------
def test_migrate_refuses_without_admin_credentials(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    assert autoport(path, "store", "init").returncode == 0
    p = autoport(path, "migrate", "erin@example.org")
    assert p.returncode == 1
    assert "no legacy admin credentials" in p.stderr and "legacy.admin_user" in p.stderr


def test_migrate_queues_copy_jobs_through_the_state_machine(cfg_path: Path, store: Store) -> None:
    store.transition("erin@example.org", State.DISCOVERED)
    for s in (State.COPYING, State.CUTOVER, State.MIGRATED):
        store.transition("alice@example.org", s)
    store.transition("bob@example.org", State.COPYING)
    # bob's job waits for his password (no login since a restart): bulk migration makes it runnable now
    store.enqueue("bob@example.org", not_before=4e9)
    p = autoport(cfg_path, "migrate", "erin@example.org", "NEW@example.org", "alice", "bob@example.org")
    assert p.returncode == 0, p.stderr
    assert "erin@example.org: queued (was discovered)" in p.stdout
    assert "new@example.org: queued" in p.stdout
    assert "alice@example.org: already migrated" in p.stdout
    assert "bob@example.org: in progress" in p.stdout
    for a in ("erin@example.org", "new@example.org", "bob@example.org"):
        assert store.state_of(a) is State.COPYING
        [job] = [j for j in store.jobs(a) if j.status == "queued"]
        assert job.not_before == 0
    assert store.jobs("alice@example.org") == []
    assert "bulk migration with legacy admin credentials" in store.events("new@example.org")[0].detail
    assert "admin-secret-pw" not in p.stdout + p.stderr

    p = autoport(cfg_path, "migrate", "someone@other.test")
    assert p.returncode == 1 and "is not an address of example.org, example.net" in p.stderr


def test_migrate_all_and_dormant_choose_their_list(cfg_path: Path, store: Store, tmp_path: Path) -> None:
    from harness.records import LEGACY, row

    store.log_messages([row("erin@example.org", LEGACY, ago=100), row("postmaster@example.org", LEGACY, ago=100)])
    p = autoport(cfg_path, "migrate", "--dormant")
    assert p.returncode == 0, p.stderr
    assert "dormant addresses: 1" in p.stdout
    assert "left out 1 suspected alias(es)/list(s): postmaster@example.org" in p.stdout
    assert store.state_of("erin@example.org") is State.COPYING
    assert store.state_of("postmaster@example.org") is None

    users = tmp_path / "users.txt"
    users.write_text("# exported from the legacy server\nfrank@example.org\nGRACE@example.net extra\n\n")
    p = autoport(cfg_path, "migrate", "--all", "--from", str(users))
    assert p.returncode == 0, p.stderr
    assert f"legacy user list: {users} (2 addresses)" in p.stdout
    assert store.state_of("grace@example.net") is State.COPYING

    store.log_messages([row("henry@example.org", LEGACY, ago=50)])
    p = autoport(cfg_path, "migrate", "--all")
    assert p.returncode == 0, p.stderr
    assert "no --from FILE, so the store's accounts and the recipients in the message log" in p.stdout
    assert "henry@example.org: queued" in p.stdout and "erin@example.org: in progress" in p.stdout
    assert "postmaster" not in p.stdout.split("legacy user list")[1]


def test_migrate_wait_without_a_sidecar_times_out_with_a_summary(cfg_path: Path, store: Store) -> None:
    p = autoport(cfg_path, "migrate", "erin@example.org", "--wait", "--timeout", "2")
    assert p.returncode == 75, p.stderr
    assert "timed out after 2 s; the copies go on in the sidecar" in p.stdout
    assert "bulk migration" in p.stdout and "copying" in p.stdout


# --- passwords -------------------------------------------------------------------------------------------
def test_passwd_from_stdin_stores_a_dovecot_hash(cfg_path: Path, store: Store) -> None:
    p = autoport(cfg_path, "passwd", "--stdin", "nobody@example.org", stdin="pw\n")
    assert p.returncode == 1 and "no account nobody@example.org: migrate it first" in p.stderr
    for s in (State.DISCOVERED, State.COPYING, State.CUTOVER, State.MIGRATED):
        store.transition("frank@example.org", s)
    p = autoport(cfg_path, "passwd", "--stdin", "frank@example.org", stdin="n3w pässword\n")
    assert p.returncode == 0, p.stderr
    assert "password set for frank@example.org (ARGON2ID)" in p.stdout
    stored = password_hash(cfg_path, "frank@example.org")
    assert stored is not None and stored.startswith("{ARGON2ID}$argon2id$")
    assert verify_password("n3w pässword", stored)
    assert "n3w" not in p.stdout + p.stderr


def test_import_hashes_validates_every_line_before_importing(cfg_path: Path, store: Store, tmp_path: Path) -> None:
    cfg = config_mod.load(cfg_path)
    sha = hash_password("erin-pw", config_mod.HashConfig(scheme="SHA512-CRYPT"))
    argon = hash_password("ivan-pw", cfg.hash)  # "m=...,t=...,p=..." has commas: CSV must still read it
    bad = tmp_path / "bad.passwd"
    bad.write_text(f"erin:{sha}:1000:1000::/home/erin:/bin/false\nfrank:{{PLAIN}}secret\ngus:{{NOPE}}xyz\nhal\n")
    p = autoport(cfg_path, "import-hashes", str(bad))
    assert p.returncode == 1
    assert "line 2: scheme PLAIN stores the password in clear: refused" in p.stderr
    assert "line 3: scheme NOPE is not supported by this Dovecot (doveadm pw -l)" in p.stderr
    assert "line 4: expected user:{SCHEME}hash" in p.stderr
    assert "nothing imported" in p.stderr and "secret" not in p.stderr
    assert store.get("erin@example.org") is None

    good = tmp_path / "good.passwd"
    good.write_text(f"erin:{sha}:1000:1000::/home/erin:/bin/false\n")
    store.transition("erin@example.org", State.DISCOVERED)
    p = autoport(cfg_path, "import-hashes", str(good))
    assert p.returncode == 0, p.stderr
    assert "imported 1 password hash(es)" in p.stdout
    assert password_hash(cfg_path, "erin@example.org") == sha

    store.transition("judy@example.org", State.COPYING)
    store.set_password_hash("judy@example.org", "{SHA512-CRYPT}$6$from$login")
    csv_file = tmp_path / "hashes.csv"
    csv_file.write_text(f"address,hash\nivan@example.org,{argon}\njudy@example.org,{sha}\n")
    p = autoport(cfg_path, "import-hashes", str(csv_file))
    assert p.returncode == 0, p.stderr
    assert "imported 1 password hash(es), 1 new account(s) (discovered)" in p.stdout
    assert "kept 1 account(s) that already have a password (--force replaces): judy@example.org" in p.stdout
    assert password_hash(cfg_path, "ivan@example.org") == argon
    assert verify_password("ivan-pw", argon)
    assert password_hash(cfg_path, "judy@example.org") == "{SHA512-CRYPT}$6$from$login"


# --- aliases ---------------------------------------------------------------------------------------------
def test_alias_commands_and_the_virtual_map(cfg_path: Path, store: Store, tmp_path: Path) -> None:
    cfg = config_mod.load(cfg_path)
    routing = RoutingPolicy(cfg, store)
    assert routing.lookup("virtual", "sales@example.org").status is Status.NOTFOUND

    p = autoport(cfg_path, "alias", "add", "Sales@example.org", "alice@example.org,bob@example.org")
    assert p.returncode == 0, p.stderr
    assert "sales@example.org -> alice@example.org, bob@example.org" in p.stdout
    p = autoport(cfg_path, "alias", "add", "sales@example.org", "carol@partner.test")
    assert "sales@example.org -> alice@example.org, bob@example.org, carol@partner.test" in p.stdout
    reply = routing.lookup("virtual", "sales@example.org")
    assert (reply.status, reply.text) == (Status.OK, "alice@example.org,bob@example.org,carol@partner.test")
    assert routing.lookup("virtual", "sales+q4@example.org").text == reply.text
    assert routing.lookup("virtual", "sales@other.test").status is Status.NOTFOUND
    assert routing.lookup("virtual", "example.org").status is Status.NOTFOUND
    assert routing.lookup("virtual", "alice@example.org").status is Status.NOTFOUND

    store.transition("alice@example.org", State.COPYING)
    p = autoport(cfg_path, "alias", "add", "alice@example.org", "bob@example.org")
    assert p.returncode == 1 and "alice@example.org is an account (copying)" in p.stderr
    p = autoport(cfg_path, "alias", "add", "@example.org", "bob@example.org")
    assert p.returncode == 1 and "catch-all aliases are not supported" in p.stderr

    virtual = tmp_path / "virtual"
    virtual.write_text(
        "# from the legacy server\n"
        "example.org   anything\n"
        "team@example.org  bob@example.org,\n"
        "    carol@example.org\n"
        "info@example.net bob@example.org carol@example.org\n"
    )
    p = autoport(cfg_path, "alias", "import", str(virtual))
    assert p.returncode == 0, p.stderr
    assert "line 2: example.org declares a virtual alias domain: skipped" in p.stdout
    assert "imported 2 alias(es)" in p.stdout
    p = autoport(cfg_path, "alias", "list")
    assert p.stdout.splitlines() == [
        "info@example.net bob@example.org, carol@example.org",
        "sales@example.org alice@example.org, bob@example.org, carol@partner.test",
        "team@example.org bob@example.org, carol@example.org",
    ]
    (tmp_path / "broken").write_text("ok@example.org bob@example.org\nbad@example.org\n")
    p = autoport(cfg_path, "alias", "import", str(tmp_path / "broken"))
    assert p.returncode == 1 and "line 2: alias bad@example.org has no target" in p.stderr
    assert store.alias_targets("ok@example.org") is None

    p = autoport(cfg_path, "alias", "remove", "sales@example.org")
    assert p.returncode == 0 and "sales@example.org removed" in p.stdout
    assert routing.lookup("virtual", "sales@example.org").status is Status.NOTFOUND
    p = autoport(cfg_path, "alias", "remove", "sales@example.org")
    assert p.returncode == 1 and "no alias sales@example.org" in p.stderr


# --- the first login of an account migrated in bulk ------------------------------------------------------
class Legacy:
    def __init__(self) -> None:
        self.calls = 0

    def verify(self, login: str, password: str, *, client_ip: str = "") -> str:
        self.calls += 1
        if password != "legacy-pw":
            raise LegacyAuthError("imap", "[AUTHENTICATIONFAILED] Authentication failed.")
        return "imap"


def test_hashless_migrated_account_verifies_once_on_legacy_and_logs_in_locally(cfg_path: Path, store: Store) -> None:
    cfg = config_mod.load(cfg_path)
    cfg.target.mail_uid, cfg.target.mail_gid = 5000, 5001
    a = "frank@example.org"
    for s in (State.DISCOVERED, State.COPYING, State.CUTOVER, State.MIGRATED):
        store.transition(a, s)
    legacy = Legacy()
    policy = AuthPolicy(cfg, store, legacy, hasher=lambda pw: hash_password(pw, config_mod.HashConfig()))

    def login(password: str) -> Any:
        return policy.decide(Request(a, password, "imap", "198.51.100.9", "192.0.2.1"))

    assert login("wrong").status == FAIL
    reply = login("legacy-pw")
    assert reply.status == OK
    # a local session: no proxy fields, only the mail uid/gid
    assert reply.fields == {"user": a, "userdb_uid": "5000", "userdb_gid": "5001"}
    account = store.get(a)
    assert account is not None and account.has_password and account.last_login_at is not None
    assert account.state is State.MIGRATED and store.jobs(a) == []
    stored = password_hash(cfg_path, a)
    assert stored is not None and verify_password("legacy-pw", stored)
    # every node is asked to forget the "unknown user" its Dovecot cached for the sql steps on the way here
    flushes = [k for k in store.pending_kicks("any-node", 0) if k.kind == "flush"]
    assert [(k.address, list(k.logins)) for k in flushes] == [(a, [a])]
    # from now on the hash decides (Dovecot's sql passdb); a later request here (a spelling Dovecot's passdb does
    # not list) is checked against that hash, never on the legacy server (issue 14)
    calls = legacy.calls
    assert login("legacy-pw").status == OK
    assert login("wrong").status == FAIL
    assert legacy.calls == calls


def test_ops_addresses() -> None:
    cfg = config_mod.from_dict({"mail": {"domains": ["example.org"]}})
    assert ops.our_address("Bob", cfg) == "bob@example.org"
    assert ops.our_address("BOB@Example.ORG", cfg) == "bob@example.org"
    for bad in ("", "a b@example.org", "x@other.test", "@example.org"):
        with pytest.raises(ops.OpsError):
            ops.our_address(bad, cfg)


@pytest.mark.postgres
def test_postgres_upgrade_to_v2_keeps_dovecots_grant_on_the_deny_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """`autoport store upgrade` does not re-grant: replacing dovecot_deny must keep Dovecot's SELECT on it, else
    every login would fail with [UNAVAILABLE] (the deny passdb's internal failure)."""
    import psycopg

    from sidecar.lab.pgcluster import PgCluster
    from sidecar.store import schema

    with PgCluster() as pg:
        pg.create_role("dovecot_v2")
        url = pg.create_database()
        monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
        s = open_store(url, dovecot_role="dovecot_v2")
        assert s.init() == 1
        monkeypatch.undo()
        assert s.upgrade() == list(range(2, schema.latest() + 1))
        a = "mia@example.org"
        for st in (State.COPYING, State.CUTOVER, State.MIGRATED):
            s.transition(a, st)
        s.set_password_hash(a, "{SHA512-CRYPT}$6$x$y")
        s.close()
        with psycopg.connect(url.replace("postgres@", "dovecot_v2@"), autocommit=True) as conn:
            assert conn.execute("SELECT login FROM dovecot_deny").fetchall() == [(a,)]
