"""`autoport finalize` on a lab: refused (with reasons) while a user is unmigrated and mail still goes to the legacy
server; once everyone is migrated it writes the configuration without the sidecar, and with the sidecar stopped
mail is delivered, users log in, and unknown addresses are rejected at RCPT."""

from __future__ import annotations

import imaplib
import os
import signal
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest
from harness.cli import autoport
from harness.waiting import wait_for, wait_state

from sidecar.lab import proc
from sidecar.states import State
from sidecar.store.base import Store

pytestmark = pytest.mark.e2e


LAB = {"prefix": "ap-final-", "users": 2}


def login(lab: dict[str, Any], user: dict[str, Any]) -> None:
    tg = lab["target"]
    with imaplib.IMAP4(tg["host"], tg["imap"], timeout=30) as c:
        c.login(user["login"], user["password"])


def send(lab: dict[str, Any], rcpt: str, msgid: str) -> None:
    tg = lab["target"]
    with smtplib.SMTP(tg["host"], tg["smtp"], timeout=30) as s:
        s.sendmail("sender@sender.test", [rcpt], f"From: sender@sender.test\r\nTo: {rcpt}\r\nMessage-ID: {msgid}\r\n"
                   "Subject: finalize\r\n\r\nhello\r\n".encode())  # fmt: skip


def wait_logged(store: Store, rcpt: str, timeout: float = 30) -> None:
    wait_for(lambda: store.message_log(rcpt), timeout, f"a message-log row for {rcpt}", interval=0.2)


def found_in_inbox(lab: dict[str, Any], user: dict[str, Any], msgid: str, timeout: float = 30) -> int:
    tg = lab["target"]
    deadline = time.monotonic() + timeout
    while True:
        with imaplib.IMAP4(tg["host"], tg["imap"], timeout=30) as c:
            c.login(user["login"], user["password"])
            c.select("INBOX", readonly=True)
            _typ, data = c.uid("SEARCH", "HEADER", "Message-ID", msgid)
        n = len(data[0].split())
        if n or time.monotonic() > deadline:
            return n
        time.sleep(0.5)


def test_finalize_refuses_then_runs_and_the_stack_works_without_the_sidecar(
    lab: dict[str, Any], store: Store
) -> None:
    first, second = lab["users"]
    login(lab, first)
    wait_state(store, first["address"], State.MIGRATED, fail_fast=False)
    # the second user has not logged in; mail for them goes to the legacy server
    send(lab, second["address"], f"<before-{time.time_ns()}@sender.test>")
    wait_logged(store, second["address"])

    out = autoport(lab, "finalize", "--check")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "account list was never read" in out.stdout  # nobody asked the legacy server who lives there
    out = autoport(lab, "inventory", "--from", "legacy")
    assert out.returncode == 0, out.stdout + out.stderr
    out = autoport(lab, "finalize", "--check")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "relayed to the legacy server" in out.stdout and second["address"] in out.stdout
    assert "never seen here: " + second["address"] in out.stdout
    out = autoport(lab, "finalize")
    assert out.returncode == 1
    assert "not yet" in out.stdout and "relayed to the legacy server" in out.stdout
    assert [e.kind for e in store.events("")] == ["inventory"]  # nothing written

    login(lab, second)  # the second user logs in: the account is known now and migrates
    wait_state(store, second["address"], State.MIGRATED, fail_fast=False)
    # the message relayed before the second user migrated was copied along: it no longer blocks
    out = autoport(lab, "finalize", "--check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "finalize may run" in out.stdout
    out = autoport(lab, "finalize", "--quiet-days", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reloaded Postfix and Dovecot" in out.stdout
    assert [e.kind for e in store.events("")] == ["finalized", "inventory"]
    # Dovecot's auth cache stays on: every login is a native one from now on
    auth = (Path(lab["target"]["dovecot_config"]).parent / "conf.d" / "10-auth.conf").read_text()
    assert "auth_cache_size = 10M\n" in auth and "driver = checkpassword" not in auth

    # the sidecar goes away: nothing below may depend on it
    pid = lab["pids"]["sidecar"]
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not proc.pid_alive(pid), 20, "the sidecar to stop")

    tg = lab["target"]
    for user in (first, second):  # native logins, checked by the store's sql passdb alone
        login(lab, user)
    with imaplib.IMAP4(tg["host"], tg["imap"], timeout=30) as c, pytest.raises(imaplib.IMAP4.error):
        c.login(first["login"], first["password"] + "x")
    # SMTP AUTH straight to Dovecot again (during the migration it went through the sidecar's relay)
    with smtplib.SMTP(tg["host"], tg["submission"], timeout=30) as s:
        s.ehlo("client.lab.test")
        assert s.login(first["login"], first["password"])[0] == 235

    msgid = f"<after-{time.time_ns()}@sender.test>"
    send(lab, first["address"], msgid)
    assert found_in_inbox(lab, first, msgid) == 1

    with smtplib.SMTP(tg["host"], tg["smtp"], timeout=30) as s:
        s.ehlo()
        s.mail("sender@sender.test")
        code, text = s.rcpt(f"nobody-{time.time_ns()}@{lab['domains'][0]}")
        assert code == 550, text
        assert b"unknown" in text.lower()
        code, _ = s.rcpt(second["address"])
        assert code == 250

    # and doctor agrees that this is the final state
    out = autoport(lab, "doctor")
    assert "final configuration (no sidecar)" in out.stdout, out.stdout
    assert "final configuration (sql passdb only)" in out.stdout
