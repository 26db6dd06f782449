"""A user's whole path on real servers: first login through the target, proxied session, copy, cutover, native login.

What the user sees is asserted: the same UIDVALIDITY and UIDs before and after, flags kept, POP3 UIDLs kept, a
message sent during the move delivered exactly once, and the account moving through the states in order.
"""

from __future__ import annotations

import imaplib
import smtplib
import time
from typing import Any

import pytest
from harness.clients import pop3_uidls
from harness.waiting import wait_state

from sidecar.states import State
from sidecar.store.base import Store

pytestmark = pytest.mark.e2e


LAB = {"prefix": "ap-mig-", "users": 3}


def imap_view(host: str, port: int, user: dict[str, Any]) -> dict[str, Any]:
    """What an IMAP client caches: per folder UIDVALIDITY and (UID, flags) list."""
    view: dict[str, Any] = {}
    with imaplib.IMAP4(host, port, timeout=30) as c:
        c.login(user["login"], user["password"])
        for folder in ("INBOX", "Sent", "Archive/2023"):
            typ, _ = c.select(f'"{folder}"', readonly=True)
            assert typ == "OK", folder
            uidvalidity = c.response("UIDVALIDITY")[1][0]
            typ, data = c.uid("FETCH", "1:*", "(UID FLAGS)")
            items = sorted(d.decode() for d in data if isinstance(d, bytes))
            view[folder] = (uidvalidity, items)
    return view


def test_first_login_migrates_and_clients_see_the_same_mailbox(lab: dict[str, Any], store: Store) -> None:
    lg, tg = lab["legacy"], lab["target"]
    user = lab["users"][0]
    legacy_view = imap_view(lg["host"], lg["imap"], user)
    legacy_uidls = pop3_uidls(lg["host"], lg["pop3"], user)

    # first login on the target, with the legacy password: the session is the legacy mailbox (proxied)
    assert imap_view(tg["host"], tg["imap"], user) == legacy_view
    states = wait_state(store, user["address"], State.MIGRATED, interval=0.05)
    assert states[-1] == "migrated", states
    assert "failed" not in states

    # native now: same UIDVALIDITY, UIDs and flags in every folder, same POP3 UIDLs
    assert imap_view(tg["host"], tg["imap"], user) == legacy_view
    assert pop3_uidls(tg["host"], tg["pop3"], user) == legacy_uidls
    transitions = [e.detail for e in store.events(user["address"]) if e.kind == "transition"]
    assert [t.split(":")[0] for t in reversed(transitions)] == [
        "(none) -> copying", "copying -> cutover", "cutover -> migrated"
    ]


def test_mail_sent_during_the_move_arrives_exactly_once(lab: dict[str, Any], store: Store) -> None:
    tg = lab["target"]
    user = lab["users"][1]
    msgid = f"<during-{time.time_ns()}@sender.test>"
    # the login queues the copy; the message is sent at once, while the account is copying or in cutover
    with imaplib.IMAP4(tg["host"], tg["imap"], timeout=30) as c:
        c.login(user["login"], user["password"])
    with smtplib.SMTP(tg["host"], tg["smtp"], timeout=30) as s:
        s.sendmail(
            "sender@sender.test", [user["address"]],
            f"From: sender@sender.test\r\nTo: {user['address']}\r\nMessage-ID: {msgid}\r\n"
            f"Subject: during\r\n\r\nhello\r\n".encode(),
        )
    wait_state(store, user["address"], State.MIGRATED)
    deadline = time.monotonic() + 30
    found: list[bytes] = []
    while time.monotonic() < deadline:
        with imaplib.IMAP4(tg["host"], tg["imap"], timeout=30) as c:
            c.login(user["login"], user["password"])
            c.select("INBOX", readonly=True)
            _typ, data = c.uid("SEARCH", "HEADER", "Message-ID", msgid)
            found = data[0].split()
        if found:
            break
        time.sleep(0.5)
    assert len(found) == 1, f"message {msgid} found {len(found)} times in the migrated INBOX"
    # and not left behind on the legacy side as a second copy the user would never see: it is in the target
    account = store.get(user["address"])
    assert account is not None and account.state is State.MIGRATED


def test_wrong_password_migrates_nothing(lab: dict[str, Any], store: Store) -> None:
    tg = lab["target"]
    user = lab["users"][2]
    with imaplib.IMAP4(tg["host"], tg["imap"], timeout=30) as c, pytest.raises(imaplib.IMAP4.error):
        c.login(user["login"], user["password"] + "x")
    assert store.get(user["address"]) is None
    assert store.jobs(user["address"]) == []
