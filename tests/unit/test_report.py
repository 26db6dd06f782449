"""`autoport report`: built from a real SQLite store filled by hand, and rendered by the CLI."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from harness.cli import autoport
from harness.records import DAY, HASH, LEGACY, LOCAL, NOW, row

from sidecar import config as config_mod
from sidecar.ops.report import build_report
from sidecar.states import State
from sidecar.store.base import Store
from sidecar.store.sqlite import SqliteStore


def fill(store: Store) -> None:
    """Accounts in every state, and a month of mail."""

    def path(address: str, *states: State) -> None:
        for s in states:
            store.transition(address, s, reason="test")

    path("alice@example.org", State.COPYING, State.CUTOVER, State.MIGRATED)  # logged in, native
    store.set_password_hash("alice@example.org", HASH)
    store.touch_login("alice@example.org")
    path("bob@example.org", State.COPYING)  # logged in, copy running
    store.touch_login("bob@example.org")
    path("carol@example.org", State.COPYING, State.CUTOVER)
    store.touch_login("carol@example.org")
    path("dave@example.org", State.COPYING, State.FAILED)
    store.touch_login("dave@example.org")
    store.set_error("dave@example.org", "SourceError: mailbox INBOX: connection reset")
    path("erin@example.org", State.DISCOVERED)  # mail seen, never logged in
    path("frank@example.org", State.DISCOVERED, State.COPYING, State.CUTOVER, State.MIGRATED)  # bulk, no login
    path("zed@example.net", State.COPYING, State.CUTOVER, State.MIGRATED)
    store.set_password_hash("zed@example.net", HASH)
    store.touch_login("zed@example.net")
    store.set_alias("sales@example.org", ["alice@example.org"])
    store.record_event("alice@example.org", "sweep-hit", "2 message(s) arrived on the legacy server after migration")

    store.log_messages([
        row("erin@example.org", LEGACY, ago=2 * DAY, size=2000),
        row("erin@example.org", LEGACY, ago=1 * DAY, size=3000),
        row("erin+news@example.org", LEGACY, ago=0.5 * DAY, size=500),
        row("ghost@example.org", LEGACY, ago=20 * DAY, size=700),  # no account, nothing recent
        row("frank@example.org", LOCAL, ago=3 * DAY, size=900),
        row("postmaster@example.org", LEGACY, ago=3 * DAY),
        row("team@example.org", LEGACY, ago=4 * DAY),
        # the legacy server distributes its list "team" to a migrated member
        row("alice@example.org", LOCAL, ago=4 * DAY, from_legacy=True, list_id="Team <team.example.org>",
            sender="team-bounces@example.org"),
        # bob's vacation message, sent by the legacy server (bob still lives there)
        row("friend@outside.test", "smtp:[mx.outside.test]", ago=1 * DAY, from_legacy=True,
            sender="bob@example.org", auto_submitted="auto-replied"),
        row("friend2@outside.test", "smtp:[mx.outside.test]", ago=1 * DAY, from_legacy=True,
            sender="bob@example.org", auto_submitted="auto-replied"),
        # carol's forward to a private address, mail from outside re-sent by the legacy server
        row("carol.private@mail.test", "smtp:[mx.mail.test]", ago=2 * DAY, from_legacy=True,
            sender="news@outside.test"),
        # bob's own outgoing mail relayed by the legacy server: not a rule
        row("x@outside.test", "smtp:[mx.outside.test]", ago=2 * DAY, from_legacy=True, sender="bob@example.org"),
        row("alice@example.org", LOCAL, ago=1 * DAY),
        # to the alias after it was created: Postfix rewrote it here, whatever smtpd logged as its route
        row("sales@example.org", LEGACY, ago=NOW - time.time() - 1),
    ])  # fmt: skip


@pytest.fixture
def store(config_store: Store) -> Store:
    return config_store


def test_report_sections_from_a_hand_filled_store(cfg_path: Path, store: Store) -> None:
    fill(store)
    cfg = config_mod.load(cfg_path)
    rep = build_report(cfg, store, days=7, now=NOW + 10).to_dict()

    assert rep["accounts"]["by_state"] == {"discovered": 1, "copying": 1, "cutover": 1, "migrated": 3, "failed": 1}
    assert rep["accounts"]["by_domain"]["example.net"]["migrated"] == 1
    assert rep["accounts"]["by_domain"]["example.org"]["migrated"] == 2

    dormant = {d["address"]: d for d in rep["dormant"]}
    assert set(dormant) == {"erin@example.org", "ghost@example.org", "frank@example.org"}
    assert dormant["erin@example.org"]["messages"] == 3  # erin+news counts for erin
    assert dormant["erin@example.org"]["bytes"] == 5500
    assert dormant["erin@example.org"]["state"] == "discovered"
    assert dormant["ghost@example.org"]["state"] == ""
    assert dormant["frank@example.org"]["state"] == "migrated"
    assert rep["dormant"][0]["address"] == "erin@example.org"  # most mail first
    assert dormant["erin@example.org"]["last_seen"].endswith("Z")

    aliases = {a["address"]: a for a in rep["aliases"]}
    assert set(aliases) == {"postmaster@example.org", "team@example.org"}
    assert aliases["team@example.org"]["kind"] == "list"
    assert "List-Id Team <team.example.org> on mail from the legacy server" in aliases["team@example.org"]["evidence"]
    assert aliases["postmaster@example.org"]["kind"] == "alias"
    assert "role address (RFC 2142)" in aliases["postmaster@example.org"]["evidence"]

    rules = {(r["kind"], r["sender"], r["recipient"]): r for r in rep["auto_rules"]}
    assert rules[("auto-reply", "bob@example.org", "friend@outside.test")]["detail"] == "Auto-Submitted: auto-replied"
    assert ("forward", "news@outside.test", "carol.private@mail.test") in rules
    assert rules[("sweep-hit", "", "alice@example.org")]["messages"] == 2
    assert not any(k[2] == "x@outside.test" for k in rules)  # a user's own mail is not a rule

    assert rep["failures"] == [
        {
            "address": "dave@example.org",
            "state": "failed",
            "attempts": 1,
            "last_error": "SourceError: mailbox INBOX: connection reset",
            "updated_at": rep["failures"][0]["updated_at"],
        }
    ]

    traffic = {t["recipient"]: t for t in rep["legacy_traffic"]}
    # ghost's mail is older than 7 days; the alias's mail was rewritten here
    assert set(traffic) == {"erin@example.org", "erin+news@example.org", "postmaster@example.org", "team@example.org"}
    assert traffic["erin@example.org"]["messages"] == 2 and traffic["erin@example.org"]["state"] == "discovered"

    ready = rep["readiness"]
    assert ready["ready"] is False
    reasons = "\n".join(ready["reasons"])
    assert "4 account(s) not migrated (1 discovered, 1 copying, 1 cutover, 1 failed)" in reasons
    assert "1 address(es) receive mail but have no account here" in reasons
    assert "1 account(s) with copy failures" in reasons
    assert "5 message(s) to 4 recipient(s) went to the legacy server in the last 7 day(s)" in reasons
    assert "2 suspected alias(es) or list(s) not recreated" in reasons
    assert "1 migrated account(s) have no password yet" in reasons
    assert "2 message(s) reached legacy mailboxes after cutover in the last 7 day(s)" in reasons


def test_legacy_user_list_turns_unknown_recipients_into_aliases(cfg_path: Path, store: Store) -> None:
    fill(store)
    cfg = config_mod.load(cfg_path)
    users = ["alice@example.org", "bob@example.org", "erin@example.org", "frank@example.org"]
    rep = build_report(cfg, store, users=users, users_source="users.txt")
    aliases = {a.address: a for a in rep.aliases}
    assert "ghost@example.org" in aliases
    assert "not in the legacy user list (users.txt)" in aliases["ghost@example.org"].evidence
    assert "ghost@example.org" not in {d.address for d in rep.dormant}


def test_ready_when_everything_is_migrated_and_quiet(cfg_path: Path, store: Store) -> None:
    cfg = config_mod.load(cfg_path)
    for a in ("alice@example.org", "bob@example.net"):
        for s in (State.COPYING, State.CUTOVER, State.MIGRATED):
            store.transition(a, s)
        store.set_password_hash(a, HASH)
        store.touch_login(a)
    store.log_messages([row("alice@example.org", LOCAL, ago=DAY), row("bob@example.net", LEGACY, ago=30 * DAY)])
    # without the legacy server's own account list nobody can say that nothing is left there
    rep = build_report(cfg, store, days=7)
    assert not rep.readiness.ready and "account list was never read" in rep.readiness.reasons[0]
    store.set_inventory("legacy", "account", ["alice@example.org", "bob@example.net"])
    rep = build_report(cfg, store, days=7)
    assert rep.readiness.ready and rep.readiness.reasons == ()
    assert rep.dormant == [] and rep.legacy_traffic == []


def test_cli_renders_table_json_and_csv(cfg_path: Path, store: Store) -> None:
    fill(store)
    store.close()
    p = autoport(cfg_path, "report")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "Dormant addresses" in out and "erin@example.org" in out
    assert "Not ready to retire the legacy server" in out
    assert "account(s) with copy failures" in out

    p = autoport(cfg_path, "report", "--format", "json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["readiness"]["ready"] is False
    assert data["dormant"][0]["address"] == "erin@example.org"

    p = autoport(cfg_path, "report", "--format", "csv", "--section", "dormant")
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert list(rows[0]) == ["address", "state", "messages", "bytes", "first_seen", "last_seen"]
    assert rows[0]["address"] == "erin@example.org" and rows[0]["messages"] == "3"

    p = autoport(cfg_path, "report", "--format", "csv", "--section", "aliases")
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    team = next(r for r in rows if r["address"] == "team@example.org")
    assert team["kind"] == "list" and "List-Id" in team["evidence"]

    p = autoport(cfg_path, "report", "--format", "csv")
    assert p.returncode == 2 and "--format csv needs --section" in p.stderr


def _queries(store: Store, build: Callable[[], object]) -> list[str]:
    """The SQL statements `build` runs on this thread's connection of the SQLite store."""
    conn = cast(SqliteStore, store)._conn()
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        build()
    finally:
        conn.set_trace_callback(None)
    return [s for s in seen if s.lstrip().upper().startswith("SELECT")]


def _listed_accounts(store: Store, first: int, n: int) -> list[str]:
    """n accounts that logged in by an old login name; the inventory lists them by that name. Returns the names."""
    names = []
    for i in range(first, first + n):
        address = f"user{i}@example.org"
        store.transition(address, State.COPYING, reason="test")
        store.add_login(address, f"old.name{i}@example.org")
        names += [address, f"old.name{i}@example.org"]
    return names


def test_report_reads_the_store_in_a_fixed_number_of_queries_whatever_the_number_of_accounts(
    cfg_path: Path, store: Store
) -> None:
    cfg = config_mod.load(cfg_path)
    fill(store)
    listed = _listed_accounts(store, 0, 3)
    store.set_inventory("file", "account", [*listed, "gone0@example.org"])
    few = _queries(store, lambda: build_report(cfg, store))

    listed += _listed_accounts(store, 3, 40)
    store.set_inventory("file", "account", [*listed, *(f"gone{i}@example.org" for i in range(30))])
    rep = build_report(cfg, store)
    many = _queries(store, lambda: build_report(cfg, store))

    assert len(many) == len(few), "\n".join(many)  # not one query per account, login or inventoried address
    # an account listed under one of its login names is known; only the 30 gone ones were never seen
    assert sorted(n.address for n in rep.never_seen) == sorted(f"gone{i}@example.org" for i in range(30))
    assert any("30 legacy account(s) in the inventory were never seen" in r for r in rep.readiness.reasons)


def test_report_tables_show_rows_first_rows_and_say_how_many_are_left_out(cfg_path: Path, store: Store) -> None:
    fill(store)
    store.set_inventory("file", "account", [f"gone{i:02d}@example.org" for i in range(60)])
    store.close()
    p = autoport(cfg_path, "report", "--section", "never_seen", "--rows", "5")
    assert p.returncode == 0, p.stderr
    shown = sorted(set(re.findall(r"gone\d\d@example\.org", p.stdout)))
    assert shown == [f"gone{i:02d}@example.org" for i in range(5)]
    assert "55 more row(s) not shown (60 in all)" in p.stdout

    p = autoport(cfg_path, "report", "--section", "never_seen")  # default: 50 rows
    assert len(set(re.findall(r"gone\d\d@example\.org", p.stdout))) == 50 and "10 more row(s)" in p.stdout
    p = autoport(cfg_path, "report", "--section", "never_seen", "--rows", "0")
    assert len(set(re.findall(r"gone\d\d@example\.org", p.stdout))) == 60 and "more row(s)" not in p.stdout
    # csv and json are not cut
    p = autoport(cfg_path, "report", "--format", "json", "--section", "never_seen", "--rows", "5")
    assert len(json.loads(p.stdout)["never_seen"]) == 60
    p = autoport(cfg_path, "report", "--format", "csv", "--section", "never_seen", "--rows", "5")
    assert len(list(csv.DictReader(io.StringIO(p.stdout)))) == 60
    p = autoport(cfg_path, "report", "--rows", "-1")
    assert p.returncode == 2 and "--rows" in p.stderr
