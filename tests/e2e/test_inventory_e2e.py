"""A lab whose five legacy users never logged in: `autoport finalize --check` refuses (first because nobody read
the legacy server's account list, then naming the five), `autoport inventory --from legacy` lists them through the
admin's other-users namespace, and once they are migrated (`migrate --all`) or excluded the check passes. Mail
relayed to the legacy server before a user migrated does not block it. Shared and other users' folders the
legacy server shows are never copied into a personal mailbox, and the report lists them."""

from __future__ import annotations

import imaplib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from harness.e2e_mail import message_id, send, target_count, wait_for

from sidecar import config
from sidecar.migration.copier import target_home
from sidecar.states import State
from sidecar.store.base import Store

pytestmark = pytest.mark.e2e


LAB = {"prefix": "ap-inv-", "users": 5, "messages_per_user": 6, "legacy_shared": True}



def autoport(lab: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.ops.cli", "--config", lab["config"], *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_finalize_refuses_until_every_legacy_account_is_migrated_or_excluded(
    lab: dict[str, Any], store: Store
) -> None:
    users = [u["address"] for u in lab["users"]]
    alice, bob = lab["users"][0], lab["users"][1]
    assert len(users) == 5 and all(store.get(u) is None for u in users)  # nobody ever logged in

    # mail reaches the legacy server for alice before she migrates
    early = message_id()
    replies, data = send(lab["target"]["host"], lab["target"]["smtp"], [alice["address"]], early)
    assert data is not None and data[0] == 250, (replies, data)
    wait_for(lambda: store.message_log(alice["address"]), 30, "the milter's row for alice")

    p = autoport(lab, "finalize", "--check")
    assert p.returncode == 1
    assert "account list was never read" in p.stdout and "autoport inventory --from legacy" in p.stdout

    p = autoport(lab, "inventory", "--from", "legacy")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "legacy: 5 account(s) (5 new, 0 no longer listed), 1 shared folder(s)" in p.stdout
    assert lab["legacy"]["admin"]["password"] not in p.stdout + p.stderr
    assert sorted(e.name for e in store.inventory("account")) == sorted(users)

    p = autoport(lab, "finalize", "--check")
    assert p.returncode == 1
    # mail for alice is not an account (the report counts her as dormant): all five are unaccounted for
    assert "5 legacy account(s) in the inventory were never seen here" in p.stdout
    assert all(u in p.stdout for u in users)

    report = json.loads(autoport(lab, "report", "--format", "json").stdout)
    assert sorted(n["address"] for n in report["never_seen"]) == sorted(users)
    assert alice["address"] in {d["address"] for d in report["dormant"]}
    assert {(f["folder"], f["source"]) for f in report["shared_folders"]} == {("Public/Announcements", "legacy")}

    last = users[-1]
    p = autoport(lab, "exclude", last, "--reason", "left the company; mailbox exported")
    assert p.returncode == 0, p.stderr
    p = autoport(lab, "migrate", "--all", "--wait", "--timeout", "240")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{last}:" not in p.stdout  # excluded: not queued
    for u in users[:-1]:
        account = store.get(u)
        assert account is not None and account.state is State.MIGRATED, (u, account)
    assert store.get(last) is None
    report = json.loads(autoport(lab, "report", "--format", "json").stdout)
    assert [n["address"] for n in report["never_seen"]] == [last]  # excluded, still listed as never seen

    # bulk-migrated accounts have no password yet: the legacy server's own hashes are imported
    p = autoport(lab, "finalize", "--check")
    assert p.returncode == 1 and "no password hash" in p.stdout
    p = autoport(lab, "import-hashes", str(Path(lab["dir"]) / "legacy" / "users"))
    assert p.returncode == 0, p.stdout + p.stderr

    # mail relayed to the legacy server for alice before she migrated was copied along: it does not block
    assert target_count(lab, alice["address"], early) == 1
    p = autoport(lab, "finalize", "--check")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "finalize may run: 4 migrated account(s)" in p.stdout

    report = json.loads(autoport(lab, "report", "--format", "json").stdout)
    assert [x["address"] for x in report["excluded"]] == [last]
    assert report["excluded"][0]["reason"] == "left the company; mailbox exported"

    # only the user's own mailbox: alice saw Public/Announcements and bob's shared Archive on the legacy server
    cfg = config.load(lab["config"])
    maildir = target_home(cfg.target.mail_root, alice["address"]) / "Maildir"
    folders = sorted(d.name for d in maildir.iterdir() if d.name.startswith("."))
    assert folders and not any(f.startswith((".Public", ".user")) for f in folders), folders
    with open(maildir / "subscriptions", encoding="utf-8") as f:
        assert "Public" not in f.read()
    shared = {(f["folder"], f["source"]) for f in report["shared_folders"]}
    assert ("Public/Announcements", f"mailbox:{alice['address']}") in shared
    assert (f"user/{bob['login']}/Archive", f"mailbox:{alice['address']}") in shared
    assert {f for f, src in shared if src == f"mailbox:{alice['address']}"} == {
        "Public/Announcements", f"user/{bob['login']}/Archive"}  # fmt: skip
    # the legacy server does show alice those folders (what the copier left out)
    lg = lab["legacy"]
    c = imaplib.IMAP4(lg["host"], lg["imap"], timeout=30)
    try:
        c.login(alice["login"], alice["password"])
        _typ, rows = c.list('""', "*")
    finally:
        c.logout()
    listed = b"\n".join(r for r in rows if isinstance(r, bytes))
    assert b"Public/Announcements" in listed and f"user/{bob['login']}/Archive".encode() in listed
