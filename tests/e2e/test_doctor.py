"""`autoport doctor` on a lab: healthy -> exit 0; a broken setup -> each problem with its fix, exit 1."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness.cli import autoport

pytestmark = pytest.mark.e2e

def doctor(config_path: str) -> subprocess.CompletedProcess[str]:
    return autoport(config_path, "doctor", timeout=120)


def problems(out: str) -> list[tuple[str, str]]:
    """(problem line, fix line) pairs as printed."""
    return re.findall(r"^\[PROBLEM\] (.*)\n\s+fix: (.*)$", out, re.M)


def test_healthy_lab(lab: dict[str, Any]) -> None:
    out = doctor(lab["config"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no problems found" in out.stdout
    for what in ("sockets: auth socket", "sockets: socketmap socket", "store: reachable", "postfix:", "dovecot:",
                 "legacy: IMAP", "legacy: POP3", "legacy: SMTP", "legacy: submission", "legacy: ManageSieve"):
        assert re.search(rf"^\[\s*ok\] {re.escape(what)}", out.stdout, re.M), (what, out.stdout)  # fmt: skip


def test_broken_setup_reports_each_problem_with_its_fix(lab: dict[str, Any], tmp_path: Path) -> None:
    text = Path(lab["config"]).read_text()
    text = re.sub(r"(?m)^imap_port = \d+", "imap_port = 1", text)
    text = re.sub(r'(?m)^tls_server_name = ".*"', 'tls_server_name = "wrong.example.net"', text)
    broken = tmp_path / "broken.toml"
    broken.write_text(text)
    broken.chmod(0o600)
    auth = config_value(text, "auth")
    os.chmod(auth, 0o600)
    try:
        out = doctor(str(broken))
    finally:
        os.chmod(auth, 0o660)
    assert out.returncode == 1, out.stdout
    found = problems(out.stdout)
    by_topic = {p.split(":", 1)[0]: (p, f) for p, f in found}

    p, fix = next((p, f) for p, f in found if "auth socket" in p)
    assert "mode 0600, needs 0660" in p and fix.startswith(f"chmod 0660 {auth}")
    p, fix = next((p, f) for p, f in found if "legacy: IMAP" in p)
    assert "not reachable" in p and "imap_port" in fix
    p, fix = next((p, f) for p, f in found if "legacy: POP3" in p)  # STARTTLS with a name the certificate lacks
    assert "certificate problem" in p and "wrong.example.net" in p
    assert "tls_server_name" in fix
    assert "sockets" in by_topic and "legacy" in by_topic
    assert out.stdout.rstrip().endswith(f"{len(found)} problem(s)")
    # nothing else was broken, and no secret is printed
    assert not any(t.startswith(("store", "postfix", "dovecot")) for t in by_topic)
    assert lab["legacy"]["admin"]["password"] not in out.stdout


def test_unreadable_config_is_one_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[legacy]\nimap_prot = 143\n")
    out = doctor(str(bad))
    assert out.returncode == 1
    [(p, fix)] = problems(out.stdout)
    assert "unknown key 'legacy.imap_prot'" in p and str(bad) in fix


def config_value(text: str, key: str) -> str:
    m = re.search(rf'(?m)^{key} = "(.*)"', text)
    assert m, key
    return m.group(1)
