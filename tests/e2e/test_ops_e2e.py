"""Bulk migration and aliases end to end: a lab (legacy server with 3 users, target stack, sidecar), the
`autoport` command as an administrator runs it, and the user's mail client and mail from outside."""

from __future__ import annotations

import imaplib
import os
import subprocess
import time
from typing import Any

import pytest
from harness.cli import autoport
from harness.e2e_mail import dovecot_config, message_id, send, target_count, wait_for

from sidecar.states import State
from sidecar.store.base import Store

pytestmark = pytest.mark.e2e


LAB = {"prefix": "ap-ops-", "users": 3}


def imap_inbox(host: str, port: int, login: str, password: str) -> list[bytes]:
    """Message-IDs of INBOX, after a LOGIN that must succeed."""
    c = imaplib.IMAP4(host, port, timeout=60)
    try:
        c.login(login, password)
        typ, _ = c.select("INBOX", readonly=True)
        assert typ == "OK"
        typ, data = c.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        assert typ == "OK"
        return sorted(bytes(part[1]).strip() for part in data if isinstance(part, tuple))
    finally:
        c.logout()


def doveadm_message_ids(lab: dict[str, Any], address: str) -> list[bytes]:
    p = subprocess.run(
        ["doveadm", "-c", dovecot_config(lab), "fetch", "-u", address, "hdr.message-id", "mailbox", "INBOX", "all"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return sorted(
        b"Message-ID: " + line.split(b":", 1)[1].strip()
        for line in p.stdout.splitlines()
        if line.lower().startswith(b"hdr.message-id:")
    )


def test_bulk_migration_of_a_user_who_never_logged_in(lab: dict[str, Any], store: Store) -> None:
    user = lab["users"][0]
    address, login, password = user["address"], user["login"], user["password"]
    lg, tg = lab["legacy"], lab["target"]
    assert store.state_of(address) is None
    legacy_ids = imap_inbox(lg["host"], lg["imap"], login, password)
    assert legacy_ids, "the lab's legacy mailbox should hold mail"

    started = time.monotonic()
    p = autoport(lab, "migrate", address, "--wait", "--timeout", "240")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{address}: queued" in p.stdout
    assert f"{address}: migrated" in p.stdout  # the progress line, then the summary table
    assert "bulk migration" in p.stdout
    assert time.monotonic() - started < 240
    account = store.get(address)
    assert account is not None and account.state is State.MIGRATED and not account.has_password
    assert lab["legacy"]["admin"]["password"] not in p.stdout + p.stderr

    # the mail is in the target mailbox (read by doveadm, no login involved)
    assert doveadm_message_ids(lab, address) == [i.replace(b"Message-Id", b"Message-ID") for i in legacy_ids]

    # mail that lands on the legacy side from now on is not what the user sees any more
    c = imaplib.IMAP4(lg["host"], lg["imap"], timeout=60)
    c.login(login, password)
    late = message_id()
    msg = f"From: x@outside.test\r\nMessage-ID: {late}\r\nSubject: late\r\n\r\nlegacy only\r\n".encode()
    assert c.append("INBOX", "", imaplib.Time2Internaldate(time.time()), msg)[0] == "OK"
    c.logout()

    # the user's first login, with the legacy password: verified there once, then a local session
    target_ids = imap_inbox(tg["host"], tg["imap"], login, password)
    assert len(target_ids) == len(legacy_ids)
    assert not any(late.encode() in i for i in target_ids)
    account = store.get(address)
    assert account is not None and account.has_password and account.last_login_at is not None
    # and natively from now on (Dovecot's sql passdb); a wrong password is refused by the deny step
    assert imap_inbox(tg["host"], tg["imap"], login, password) == target_ids
    c = imaplib.IMAP4(tg["host"], tg["imap"], timeout=60)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        c.login(login, "not-the-password")
    c.shutdown()

    # the report counts the account as migrated
    p = autoport(lab, "report", "--format", "json")
    assert p.returncode == 0, p.stderr
    assert '"migrated": 1' in p.stdout


def test_alias_added_with_the_cli_delivers_to_a_migrated_mailbox(lab: dict[str, Any], store: Store) -> None:
    user = lab["users"][1]
    address = user["address"]
    domain = address.rpartition("@")[2]
    p = autoport(lab, "migrate", address, "--wait", "--timeout", "240")
    assert p.returncode == 0, p.stdout + p.stderr

    alias = f"team-{os.getpid()}@{domain}"
    p = autoport(lab, "alias", "add", alias, address)
    assert p.returncode == 0, p.stderr
    assert f"{alias} -> {address}" in p.stdout

    mid = message_id()
    replies, data = send(lab["target"]["host"], lab["target"]["smtp"], [alias], mid)
    assert replies[alias][0] == 250, replies
    assert data is not None and data[0] == 250, data
    wait_for(lambda: target_count(lab, address, mid) == 1, 60, f"{mid} in {address}'s target INBOX")


def test_alias_with_an_address_extension_reaches_a_legacy_mailbox(lab: dict[str, Any], store: Store) -> None:
    """sales+tag@ where sales@ is an alias of an account still on the legacy server: delivered to that account's
    legacy mailbox. Postfix appends an unmatched extension to alias targets by default
    (propagate_unmatched_extensions); the legacy server need not know user+tag (the lab's answers 550), so
    main.cf keeps the extension off the targets, as the socketmap's answers did."""
    from harness.e2e_mail import legacy_count

    user = lab["users"][2]
    address = user["address"]
    assert store.state_of(address) is None  # still on the legacy server
    alias = f"sales-{os.getpid()}@{address.rpartition('@')[2]}"
    p = autoport(lab, "alias", "add", alias, address)
    assert p.returncode == 0, p.stderr
    tagged = alias.replace("@", "+quote@")
    mid = message_id()
    replies, data = send(lab["target"]["host"], lab["target"]["smtp"], [tagged], mid)
    assert replies[tagged][0] == 250, replies
    assert data is not None and data[0] == 250, data
    wait_for(lambda: legacy_count(lab, address, mid) == 1, 60, f"{mid} in {address}'s legacy INBOX")
