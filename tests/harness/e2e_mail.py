"""Helpers for the routing and milter end-to-end tests: send by SMTP, find a message by Message-ID on either side."""

from __future__ import annotations

import imaplib
import json
import smtplib
import subprocess
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from harness.waiting import wait_for as wait_for  # its home is harness/waiting.py
from sidecar.lab.info import LabInfo
from sidecar.states import State
from sidecar.store.base import Store

SENDER = "someone@outside.test"


def message_id() -> str:
    return f"<{uuid.uuid4().hex}@e2e.test>"


def make_message(rcpts: list[str], mid: str, *, sender: str = SENDER, headers: dict[str, str] | None = None,
                 body: str = "hello\n") -> bytes:  # fmt: skip
    m = EmailMessage()
    m["From"] = sender
    m["To"] = ", ".join(rcpts)
    m["Subject"] = f"e2e {mid}"
    m["Message-ID"] = mid
    for k, v in (headers or {}).items():
        m[k] = v
    m.set_content(body)
    return m.as_bytes()


def send(
    host: str,
    port: int,
    rcpts: list[str],
    mid: str,
    *,
    sender: str = SENDER,
    source: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[dict[str, tuple[int, str]], tuple[int, str] | None]:
    """One SMTP transaction: the reply to each RCPT, and to DATA (None when no recipient was accepted)."""
    replies: dict[str, tuple[int, str]] = {}
    with smtplib.SMTP(host, port, timeout=60, source_address=(source, 0) if source else None) as s:
        s.ehlo("client.e2e.test")
        code, msg = s.mail(sender)
        assert code == 250, msg
        for r in rcpts:
            code, msg = s.rcpt(r)
            replies[r] = (code, msg.decode())
        if not any(c == 250 for c, _ in replies.values()):
            s.rset()
            return replies, None
        code, msg = s.data(make_message(rcpts, mid, sender=sender, headers=headers))
        return replies, (code, msg.decode())


def legacy_count(lab: LabInfo, address: str, mid: str) -> int:
    """How many messages with this Message-ID the legacy INBOX of `address` holds (IMAP, plain login)."""
    user = next(u for u in lab["users"] if u["address"] == address)
    c = imaplib.IMAP4(lab["legacy"]["host"], lab["legacy"]["imap"], timeout=30)
    try:
        c.login(user["login"], user["password"])
        c.select("INBOX", readonly=True)
        typ, data = c.search(None, "HEADER", "Message-ID", mid)
        assert typ == "OK"
        return len((data[0] or b"").split())
    finally:
        c.logout()


def target_count(lab: LabInfo, address: str, mid: str) -> int:
    """How many messages with this Message-ID the target INBOX of `address` holds (doveadm search)."""
    conf = dovecot_config(lab)
    p = subprocess.run(
        ["doveadm", "-c", conf, "search", "-u", address, "mailbox", "INBOX", "header", "Message-ID", mid],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if p.returncode == 67:  # no such user in the target userdb: no account, no mailbox
        return 0
    assert p.returncode == 0, p.stderr
    return len(p.stdout.split("\n")) - 1


def dovecot_config(lab: LabInfo) -> str:
    return lab["target"]["dovecot_config"]


def postfix_config(lab: LabInfo) -> str:
    return lab["target"]["postfix_config"]


def postfix_log(lab: LabInfo) -> str:
    return (Path(lab["logs"]) / "target-postfix.log").read_text(errors="replace")


def queue(lab: LabInfo) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["postqueue", "-c", postfix_config(lab), "-j"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def queue_id(data_reply: tuple[int, str] | None) -> str:
    assert data_reply is not None and data_reply[0] == 250, data_reply
    return data_reply[1].rsplit(" ", 1)[-1]


def move(store: Store, address: str, *states: State) -> None:
    for s in states:
        store.transition(address, s, reason="e2e test")


def migrate(store: Store, address: str) -> None:
    move(store, address, State.COPYING, State.CUTOVER, State.MIGRATED)
