"""The lab as a whole: `autoport lab up --json` shape, greetings on both sides, `lab down` leaves nothing."""

from __future__ import annotations

import imaplib
import json
import os
import poplib
import smtplib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness.cli import AUTOPORT, autoport

from sidecar import config
from sidecar.lab import launcher, proc

pytestmark = pytest.mark.e2e


def _lab_processes(lab_dir: Path) -> list[str]:
    """Command lines of live processes whose command line or cwd mentions the lab directory."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(lab_dir) in cmd and proc.pid_alive(int(entry)):
            found.append(f"{entry}: {cmd}")
    return found


def test_lab_up_json_shape_and_down_leaves_nothing(lab_dir: Path) -> None:
    out = subprocess.run(
        [AUTOPORT, "lab", "up", "--dir", str(lab_dir), "--json", "--users", "2"],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr
    info: dict[str, Any] = json.loads(out.stdout)
    for key in ("dir", "config", "legacy", "target", "users", "pids", "logs"):
        assert key in info
    for key in ("host", "imap", "pop3", "smtp", "sieve"):
        assert key in info["legacy"]
    assert set(info["legacy"]["admin"]) >= {"user", "password"}
    for key in ("host", "imap", "pop3", "smtp", "submission", "socketmap", "dashboard"):
        assert key in info["target"]
    for key in ("imap", "pop3", "smtp", "submission"):
        assert isinstance(info["target"][key], int)
    assert info["target"]["socketmap"].startswith(("unix:", "inet:"))
    assert len(info["users"]) == 2 and {"address", "password"} <= set(info["users"][0])
    pids = info["pids"]
    assert {"legacy-dovecot", "legacy-postfix", "target-dovecot", "target-postfix", "sidecar"} <= set(pids)
    assert all(proc.pid_alive(p) for p in pids.values())
    assert _lab_processes(lab_dir)
    # its own legacy server on loopback: the lab's short cutover grace, not the production default
    assert config.load(info["config"]).limits.cutover_grace == launcher.LAB_CUTOVER_GRACE

    down = subprocess.run([AUTOPORT, "lab", "down", "--dir", str(lab_dir)], capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert not [p for p in pids.values() if proc.pid_alive(p)]
    assert _lab_processes(lab_dir) == []


def test_target_greets_on_every_protocol(lab: dict[str, Any]) -> None:
    t = lab["target"]
    with imaplib.IMAP4(t["host"], t["imap"], timeout=10) as c:
        assert c.welcome.startswith(b"* OK")
        assert "STARTTLS" in c.capabilities or "AUTH=PLAIN" in c.capabilities
    p = poplib.POP3(t["host"], t["pop3"], timeout=10)
    assert p.getwelcome().startswith(b"+OK")
    p.quit()
    for port in (t["smtp"], t["submission"]):
        with smtplib.SMTP(t["host"], port, timeout=10) as s:
            code, _ = s.ehlo("client.test")
            assert code == 250


def test_legacy_greets_and_serves_generated_mail(lab: dict[str, Any]) -> None:
    lg = lab["legacy"]
    user = lab["users"][0]
    with imaplib.IMAP4(lg["host"], lg["imap"], timeout=10) as c:
        c.login(user["login"], user["password"])
        typ, data = c.select("INBOX", readonly=True)
        assert typ == "OK" and int(data[0]) > 0
    p = poplib.POP3(lg["host"], lg["pop3"], timeout=10)
    p.user(user["login"])
    p.pass_(user["password"])
    count, _ = p.stat()
    assert count > 0
    p.quit()


def test_status_summary_on_fresh_store(lab: dict[str, Any]) -> None:
    out = autoport(lab, "status", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert set(summary["accounts"]) == {"discovered", "copying", "cutover", "migrated", "failed"}
