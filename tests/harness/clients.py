"""Real mail clients run by the e2e tests: fetchmail (its state in a directory of the test's own), POP3 UIDL."""

from __future__ import annotations

import os
import poplib
import subprocess
from pathlib import Path
from typing import Any


def fetchmail_keep(d: Path, host: str, port: int, login: str, password: str) -> tuple[int, int, str]:
    """fetchmail in keep mode with UIDL tracking (its memory keyed by host and user); (exit, messages so far, log)."""
    d.mkdir(exist_ok=True)
    rc = d / "fetchmailrc"
    fd = os.open(rc, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # fetchmail reads the password only from here
    with os.fdopen(fd, "w") as f:
        f.write(
            f'set idfile "{d}/fetchids"\npoll {host} protocol pop3 service {port} uidl\n'
            f'  user "{login}" there with password "{password}" is root here\n'
            f'  options keep sslproto "" bsmtp "{d}/mail.bsmtp"\n'
        )
    env = {"PATH": os.environ["PATH"], "HOME": str(d), "LC_ALL": "C"}
    p = subprocess.run(
        ["fetchmail", "-f", str(rc), "--pidfile", str(d / "pid"), "-v"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    out = d / "mail.bsmtp"
    n = sum(1 for line in out.read_text().splitlines() if line.startswith("MAIL FROM:")) if out.exists() else 0
    return p.returncode, n, p.stdout + p.stderr


def pop3_uidls(host: str, port: int, user: dict[str, Any]) -> list[bytes]:
    """The UIDL list a POP3 client gets (USER/PASS with the lab user's login and password)."""
    p = poplib.POP3(host, port, timeout=30)
    try:
        p.user(user["login"])
        p.pass_(user["password"])
        return [line.split()[1] for line in p.uidl()[1]]
    finally:
        p.quit()
