"""Inventory of legacy accounts, exclusions and the readiness verdict, on a real SQLite store filled by hand
(the listing from real servers: tests/e2e/test_inventory_e2e.py)."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import pytest
from harness.cli import autoport, write_config
from harness.records import HASH, LEGACY, NOW, row

from sidecar import config as config_mod
from sidecar.ops import finalize, inventory
from sidecar.ops.report import build_report
from sidecar.states import State
from sidecar.store import open_store
from sidecar.store.base import Store


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
def store(cfg_path: Path) -> Store:
    s = open_store(config_mod.load(cfg_path).store.url)
    s.init()
    return s


def migrate(store: Store, address: str) -> None:
    for s in (State.COPYING, State.CUTOVER, State.MIGRATED):
        store.transition(address, s)
    store.set_password_hash(address, HASH)


def test_finalize_refuses_without_an_inventory_and_while_listed_accounts_were_never_seen(
    cfg_path: Path, store: Store
) -> None:
    cfg = config_mod.load(cfg_path)
    # nobody ever logged in and no mail arrived: the store is empty, yet five mailboxes live on the legacy server
    verdict = finalize.check(cfg, store)
    assert not verdict.ready
    assert "account list was never read" in verdict.reasons[0] and "autoport inventory --from legacy" in (
        verdict.reasons[0]
    )

    users = [f"{n}@example.org" for n in ("alice", "bob", "carol", "dave", "erin")]
    store.set_inventory("legacy", "account", users)
    verdict = finalize.check(cfg, store)
    assert not verdict.ready
    (reason,) = verdict.reasons
    assert reason.startswith("5 legacy account(s) in the inventory were never seen here")
    assert all(u in reason for u in users)
    assert "autoport migrate --all" in reason and "autoport exclude ADDRESS --reason TEXT" in reason

    for u in users[:3]:
        migrate(store, u)
    store.transition(users[3], State.COPYING)  # under way: the store's own reason names it, not the inventory's
    verdict = finalize.check(cfg, store)
    assert len(verdict.reasons) == 2
    assert "1 account(s) not migrated: dave@example.org (copying)" in verdict.reasons[0]
    assert verdict.reasons[1].startswith("1 legacy account(s) in the inventory were never seen here: erin@")

    store.set_exclusion(users[4], "left in 2019; mailbox archived elsewhere")
    store.set_exclusion(users[3], "shared scanner account")
    verdict = finalize.check(cfg, store)
    assert verdict.ready, verdict.reasons
    assert verdict.mailboxes == tuple(users[:3])  # excluded accounts are not given a mailbox

    store.remove_exclusion(users[4])
    assert not finalize.check(cfg, store).ready


def test_a_login_name_in_the_inventory_counts_as_seen_through_its_account(cfg_path: Path, store: Store) -> None:
    cfg = config_mod.load(cfg_path)
    migrate(store, "alice@example.org")
    store.add_login("alice@example.org", "asmith@example.org")
    store.set_inventory("legacy", "account", ["asmith@example.org"])
    assert finalize.check(cfg, store).ready


def test_mail_relayed_before_an_account_migrated_does_not_block_but_later_mail_does(
    cfg_path: Path, store: Store
) -> None:
    cfg = config_mod.load(cfg_path)
    store.set_inventory("file:/x", "account", ["alice@example.org"])
    # while alice still lived on the legacy server (NOW is when test_report was imported: before her migration)
    store.log_messages([row("alice@example.org", LEGACY, ago=60)])
    assert "relayed to the legacy server" in " ".join(finalize.check(cfg, store).reasons)
    migrate(store, "alice@example.org")
    verdict = finalize.check(cfg, store)
    assert verdict.ready, verdict.reasons
    rep = build_report(cfg, store)
    assert rep.readiness.ready, rep.readiness.reasons
    assert rep.legacy_traffic == []
    # relayed after the migration (a stale route somewhere): blocks, as before
    store.log_messages([row("alice@example.org", LEGACY, ago=NOW - time.time() - 60)])  # a minute from now
    assert "relayed to the legacy server" in " ".join(finalize.check(cfg, store).reasons)


def test_report_sections_never_seen_excluded_and_shared_folders(cfg_path: Path, store: Store) -> None:
    cfg = config_mod.load(cfg_path)
    migrate(store, "alice@example.org")
    store.set_inventory("legacy", "account", ["alice@example.org", "bob@example.org", "carol@example.org"])
    store.set_inventory("ldap", "account", {"bob@example.org": "uid=bob,ou=people,dc=example,dc=org"})
    store.set_inventory("legacy", "shared-folder", {"Public/Announcements": "shared namespace Public/"})
    store.set_inventory("mailbox:alice@example.org", "shared-folder", {"user/bob/Archive": "other-users namespace"})
    store.set_exclusion("carol@example.org", "on leave, migrates by hand")
    data = build_report(cfg, store).to_dict()
    assert [(n["address"], n["sources"]) for n in data["never_seen"]] == [
        ("bob@example.org", ["ldap", "legacy"]),
        ("carol@example.org", ["legacy"]),
    ]
    assert data["never_seen"][0]["first_listed"].endswith("Z")
    assert data["excluded"][0]["address"] == "carol@example.org"
    assert data["excluded"][0]["reason"] == "on leave, migrates by hand"
    assert {f["folder"] for f in data["shared_folders"]} == {"Public/Announcements", "user/bob/Archive"}
    reasons = " ".join(data["readiness"]["reasons"])
    assert "1 legacy account(s) in the inventory were never seen here: bob@example.org" in reasons


def test_inventory_file_formats_and_names() -> None:
    importlib.import_module("sidecar.migration.copier")  # sidecar.legacy.imap is imported through the copier
    from sidecar.legacy.imap import Namespaces

    assert inventory.account_name("user.alice", "user.", ".") == "alice"
    assert inventory.account_name("user.alice^smith", "user.", ".") == "alice.smith"
    assert inventory.account_name("user.alice.Sent", "user.", ".") is None
    assert inventory.account_name("user/alice@example.org", "user/", "/") == "alice@example.org"
    assert inventory.account_name("Other Users/bob", "Other Users/", "/") == "bob"
    assert inventory.account_name("INBOX", "user/", "/") is None

    ns = Namespaces(personal=(("", "/"),), other=(("user/", "/"),), shared=(("Public/", "/"),))
    assert ns.foreign("INBOX") is None and ns.foreign("Archive/2023") is None
    assert ns.foreign("user/bob@example.org/Archive") == "other-users"
    assert ns.foreign("Public/Announcements") == "shared" and ns.foreign("Public") == "shared"
    cyrus = Namespaces(personal=(("INBOX.", "."),), other=(("user.", "."),), shared=(("", "."),))
    assert cyrus.foreign("INBOX.Sent") is None and cyrus.foreign("INBOX") is None
    assert cyrus.foreign("user.bob") == "other-users"
    assert cyrus.foreign("shared-folder") == "shared"  # Cyrus' shared namespace has the empty prefix
    assert Namespaces().foreign("anything") is None


def test_cli_inventory_from_file_exclude_and_report(cfg_path: Path, tmp_path: Path, store: Store) -> None:
    users = tmp_path / "users"
    users.write_text(
        "# exported from the legacy server\n"
        "alice@example.org:{SHA512-CRYPT}$6$x$y:5000:5000::/home/alice::\n"  # a Dovecot passwd-file line
        "bob\n"  # a bare login: the default domain
        "\n"
        "carol@example.org, Carol C\n"
        "stranger@elsewhere.test\n"
    )
    store.close()
    p = autoport(cfg_path, "inventory", "--from", "file", str(users))
    assert p.returncode == 0, p.stderr
    assert "3 account(s) (3 new, 0 no longer listed)" in p.stdout
    assert "skipped" in p.stdout and "stranger@elsewhere.test" in p.stdout
    assert "3 never seen here" in p.stdout

    p = autoport(cfg_path, "finalize", "--check")
    assert p.returncode == 1 and "3 legacy account(s) in the inventory were never seen here" in p.stdout

    p = autoport(cfg_path, "exclude", "bob")
    assert p.returncode == 2 and "--reason" in p.stderr
    for who in ("alice", "bob", "carol"):
        p = autoport(cfg_path, "exclude", who, "--reason", "archived elsewhere")
        assert p.returncode == 0, p.stderr
    assert "bob@example.org (never seen): excluded: archived elsewhere" in p.stdout or "carol" in p.stdout
    p = autoport(cfg_path, "finalize", "--check")
    assert p.returncode == 0, p.stdout + p.stderr

    p = autoport(cfg_path, "report", "--format", "json")
    data = json.loads(p.stdout)
    assert [x["address"] for x in data["excluded"]] == ["alice@example.org", "bob@example.org", "carol@example.org"]
    assert data["readiness"]["ready"] is True
    p = autoport(cfg_path, "report")
    assert "Accounts left behind on purpose" in p.stdout and "archived elsewhere" in p.stdout

    p = autoport(cfg_path, "exclude", "--remove", "bob")
    assert p.returncode == 0
    p = autoport(cfg_path, "inventory", "--json")
    data = json.loads(p.stdout)
    assert len(data["accounts"]) == 3 and [n["address"] for n in data["never_seen"]] == [
        "alice@example.org", "bob@example.org", "carol@example.org"]  # fmt: skip
    assert autoport(cfg_path, "finalize", "--check").returncode == 1

    # the file no longer lists carol: the next run drops her from this source
    users.write_text("alice@example.org\nbob@example.org\n")
    p = autoport(cfg_path, "inventory", "--from", "file", str(users))
    assert "(0 new, 1 no longer listed)" in p.stdout


def test_ldap_section_is_checked(tmp_path: Path) -> None:
    p = tmp_path / "a.toml"
    p.write_text('[ldap]\nurl = "http://x"\n')
    with pytest.raises(config_mod.ConfigError, match=r"ldap\.url"):
        config_mod.load(p)
    p.write_text('[ldap]\nbind_passwd = "x"\n')
    with pytest.raises(config_mod.ConfigError, match=r"unknown key 'ldap.bind_passwd'"):
        config_mod.load(p)
    p.write_text('[ldap]\nurl = "ldap://127.0.0.1"\nbind_password = "s3cret-bind"\n')
    cfg = config_mod.load(p)
    assert "s3cret-bind" not in config_mod.render(cfg) and "s3cret-bind" in config_mod.secrets(cfg)


def test_report_readiness_leaves_excluded_accounts_out_like_finalize(cfg_path: Path, store: Store) -> None:
    cfg = config_mod.load(cfg_path)
    store.set_inventory("legacy", "account", ["ghost@example.org", "dave@example.org"])
    store.log_messages([row("ghost@example.org", LEGACY, ago=60)])  # mail, no account: dormant
    for s in (State.COPYING, State.FAILED):
        store.transition("dave@example.org", s)
    assert not build_report(cfg, store).readiness.ready
    assert not finalize.check(cfg, store).ready
    store.set_exclusion("ghost@example.org", "role mailbox, nobody reads it")
    store.set_exclusion("dave@example.org", "corrupt mailbox, restored from backup elsewhere")
    rep = build_report(cfg, store)
    assert rep.readiness.ready, rep.readiness.reasons
    assert [d.address for d in rep.dormant] == ["ghost@example.org"]  # still shown, no longer blocking
    assert finalize.check(cfg, store).ready



def test_listed_legacy_logins_map_through_the_login_map(cfg_path: Path, tmp_path: Path, store: Store) -> None:
    """The legacy server lists its logins (`jsmith`); with `autoport import-users` that login is the account
    john.smith@, so the inventory, "never seen" and finalize name john.smith@, not a jsmith@ nobody has."""
    users = tmp_path / "users.csv"
    users.write_text("jsmith,john.smith@example.org\n")
    listed = tmp_path / "listed"
    listed.write_text("jsmith\nbob\n")
    store.close()
    assert autoport(cfg_path, "import-users", str(users)).returncode == 0
    p = autoport(cfg_path, "inventory", "--from", "file", str(listed))
    assert p.returncode == 0, p.stderr
    data = json.loads(autoport(cfg_path, "inventory", "--json").stdout)
    file_accounts = {a["address"] for a in data["accounts"] if a["source"].startswith("file:")}
    assert file_accounts == {"john.smith@example.org", "bob@example.org"}
    assert "jsmith@example.org" not in p.stdout
    never = [n["address"] for n in data["never_seen"]]
    assert never == ["bob@example.org", "john.smith@example.org"]

    s = open_store(config_mod.load(cfg_path).store.url)
    try:
        migrate(s, "john.smith@example.org")
        s.set_inventory("legacy", "account", [])
    finally:
        s.close()
    data = json.loads(autoport(cfg_path, "inventory", "--json").stdout)
    assert [n["address"] for n in data["never_seen"]] == ["bob@example.org"]
