"""Clients for the pass-through tests: IMAP, POP3 and SMTP AUTH from a chosen 127.0.0.x source address.

Each helper answers what the user sees: ("OK" | "NO" | "TEMP" | ..., the server's text). Dovecot's and
Postfix's penalties and delays are per client address, so tests that fail on purpose use addresses of their own.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import poplib
import smtplib
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TIMEOUT = 30.0


class SourceIMAP(imaplib.IMAP4):
    """imaplib.IMAP4 connecting from a given local address."""

    def __init__(self, host: str, port: int, source: str = "", timeout: float = TIMEOUT) -> None:
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        src = (self._source, 0) if self._source else None
        return socket.create_connection((self.host, self.port), timeout, source_address=src)


class SourcePOP3(poplib.POP3):
    def __init__(self, host: str, port: int, source: str = "", timeout: float = TIMEOUT) -> None:
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        src = (self._source, 0) if self._source else None
        return socket.create_connection((self.host, self.port), timeout, source_address=src)


def imap_result(
    host: str, port: int, user: str, password: str, source: str = "", timeout: float = TIMEOUT
) -> tuple[str, str]:
    """("OK", text) after LOGIN (and LOGOUT), or ("NO" | "BAD" | "BYE", the server's text)."""
    imap = SourceIMAP(host, port, source, timeout)
    try:
        typ, data = imap._simple_command("LOGIN", imap._quote(user), imap._quote(password))  # type: ignore[attr-defined]
        text = (data[-1] or b"").decode() if data else ""
        if typ == "OK":
            imap.logout()
        return typ, text
    except imaplib.IMAP4.error as e:
        text = str(e)
        return ("NO" if "NO" in text or "[" in text else "ERROR"), text
    finally:
        with contextlib.suppress(OSError):
            imap.shutdown()


def imap_mailbox(host: str, port: int, user: str, password: str, source: str = "") -> tuple[int, int]:
    """(UIDVALIDITY, message count) of INBOX after a LOGIN that must succeed."""
    imap = SourceIMAP(host, port, source)
    try:
        imap.login(user, password)
        typ, data = imap.select("INBOX", readonly=True)
        assert typ == "OK", data
        count = int(data[0] or b"0")
        _, uv = imap.response("UIDVALIDITY")
        imap.logout()
        return int(uv[0]), count
    finally:
        with contextlib.suppress(OSError):
            imap.shutdown()


def pop3_result(
    host: str, port: int, user: str, password: str, source: str = "", timeout: float = TIMEOUT
) -> tuple[str, str]:
    """("+OK", STAT count as text) after USER/PASS, or ("-ERR", the server's text)."""
    pop = SourcePOP3(host, port, source, timeout)
    try:
        pop.user(user)
        try:
            pop.pass_(password)
        except poplib.error_proto as e:
            return "-ERR", str(e)
        count, _size = pop.stat()
        pop.quit()
        return "+OK", str(count)
    finally:
        pop.close()


def smtp_auth_result(host: str, port: int, user: str, password: str, source: str = "") -> tuple[int, str]:
    """(reply code, text) of AUTH PLAIN on the submission port."""
    with smtplib.SMTP(host, port, timeout=TIMEOUT, source_address=(source, 0) if source else None) as smtp:
        smtp.ehlo("client.lab.test")
        try:
            code, text = smtp.login(user, password)
        except smtplib.SMTPAuthenticationError as e:
            code, text = e.smtp_code, e.smtp_error
        except smtplib.SMTPResponseException as e:
            code, text = e.smtp_code, e.smtp_error
        return code, text.decode() if isinstance(text, bytes) else str(text)


def hash_accepts(password_hash: str, password: str) -> bool:
    """`doveadm pw -t HASH` with the password on stdin (never argv)."""
    p = subprocess.run(
        ["doveadm", "pw", "-t", password_hash],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return p.returncode == 0 and "(verified)" in p.stdout


class LogMark:
    """Lines appended to a log file since the mark was taken."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def lines(self) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read().decode("utf-8", "replace").splitlines()


def lab_state(lab_dir: str | Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((Path(lab_dir) / "lab-state.json").read_text())
    return data


TEMPORARY_MARKS = ("[UNAVAILABLE]", "[SYS/TEMP]", "454")


def retrying_temporary(call: Callable[..., tuple[Any, str]], *args: Any, timeout: float = 60.0) -> tuple[Any, str]:
    """call(*args) again while it answers a temporary failure, as a mail client would: an account in cutover
    refuses new proxied sessions for a few seconds (sidecar.migration.cutover). Any other answer is returned."""
    deadline = time.monotonic() + timeout
    while True:
        result = call(*args)
        temporary = any(m in f"{result[0]} {result[1]}" for m in TEMPORARY_MARKS)
        if not temporary or time.monotonic() > deadline:
            return result
        time.sleep(0.5)
