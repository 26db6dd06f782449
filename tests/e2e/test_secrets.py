"""Passwords never leak: after logins on every protocol (right and wrong passwords, first and native logins),
no test password appears in the lab's logs, the store files, the generated configuration, or the command
lines and environments of the lab's processes (sidecar, Dovecot, Postfix and their children).

Excluded, as the only places that must hold them: lab-state.json (the lab's own record of its users) and the
legacy server's passwd-file (its own user database, hashes only, but excluded on principle).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.passthrough_helpers import imap_mailbox, imap_result, pop3_result, smtp_auth_result

from sidecar.auth import passwords
from sidecar.config import HashConfig
from sidecar.lab import launcher, proc
from sidecar.states import State
from sidecar.store import open_store

EXCLUDED_NAMES = {"lab-state.json", "lab-state.tmp"}


LAB = {"prefix": "ap-sec-", "users": 4, "settings": {"limits": {"copy_concurrency": 0}}}


def _exercise(info: dict[str, Any]) -> list[str]:
    """Log users in every way there is; the passwords used."""
    t = info["target"]
    host, imap, pop3, sub = t["host"], t["imap"], t["pop3"], t["submission"]
    users = info["users"]
    used: list[str] = []
    a, b, c, d = users[0], users[1], users[2], users[3]
    # first logins, all three protocols, proxied to legacy
    assert imap_mailbox(host, imap, a["login"], a["password"])[1] > 0
    assert pop3_result(host, pop3, b["login"], b["password"])[0] == "+OK"
    assert smtp_auth_result(host, sub, c["login"], c["password"])[0] == 235
    used += [a["password"], b["password"], c["password"]]
    # wrong passwords on all three
    wrong = ["Wr0ng-Secret-imap", "Wr0ng-Secret-pop3", "Wr0ng-Secret-smtp"]
    # SMTP first: Postfix gives up on Dovecot after ~10 s, and the legacy server slows each later wrong check
    assert smtp_auth_result(host, sub, d["login"], wrong[2], source="127.0.0.53")[0] == 535
    assert imap_result(host, imap, d["login"], wrong[0], source="127.0.0.51")[0] == "NO"
    assert pop3_result(host, pop3, d["login"], wrong[1], source="127.0.0.52")[0] == "-ERR"
    used += wrong
    # a migrated account with a new password: native logins, and its old one refused
    store = open_store(info["store"])
    try:
        store.transition(a["address"], State.CUTOVER, expect=State.COPYING)
        store.transition(a["address"], State.MIGRATED, expect=State.CUTOVER)
        new = "N3w-Native-Secret-" + a["password"][:4]
        store.set_password_hash(a["address"], passwords.hash_password(new, HashConfig()))
    finally:
        store.close()
    assert imap_result(host, imap, a["login"], new)[0] == "OK"
    assert pop3_result(host, pop3, a["login"], new)[0] == "+OK"
    assert smtp_auth_result(host, sub, a["login"], new)[0] == 235
    assert imap_result(host, imap, a["login"], a["password"], source="127.0.0.54")[0] == "NO"
    used.append(new)
    return used


def _lab_pids(info: dict[str, Any]) -> set[int]:
    """The lab's processes: the recorded masters and every process in their process groups."""
    pids = {int(p) for p in info["pids"].values() if p}
    state = launcher.lab_info(Path(info["dir"]))
    pids |= {int(p) for p in state["pids"].values() if p}
    out = set(pids)
    for pgid in pids:
        out |= set(proc.group_members(pgid))
    return out


def _files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if n in EXCLUDED_NAMES:
                continue
            if p.parent.name == "legacy" and n == "users":  # the legacy server's passwd-file
                continue
            if p.is_file() and not p.is_symlink():
                yield p


def test_no_password_in_logs_store_config_or_processes(lab: dict[str, Any]) -> None:
    used = _exercise(lab)
    needles = [pw.encode() for pw in used]
    assert all(len(n) >= 8 for n in needles)
    lab_dir = Path(lab["dir"])
    places: list[tuple[str, bytes]] = []
    # logs, the store (database, WAL, shm), the generated configuration (target dir, autoport.toml, run/)
    for sub in ("logs", "store", "target", "run"):
        for p in _files(lab_dir / sub):
            with open(p, "rb") as f:
                places.append((str(p), f.read()))
    places.append(("autoport.toml", (lab_dir / "autoport.toml").read_bytes()))
    scanned_logs = [p for p, _ in places if "/logs/" in p]
    assert any(p.endswith("sidecar.log") for p in scanned_logs)
    assert any(p.endswith("target-dovecot.log") for p in scanned_logs)
    assert any(p.endswith("autoport.db") for p, _ in places)
    # the lab's processes
    pids = _lab_pids(lab)
    assert len(pids) > 5
    for pid in pids:
        for what in ("cmdline", "environ"):
            try:
                places.append((f"/proc/{pid}/{what}", Path(f"/proc/{pid}/{what}").read_bytes()))
            except OSError:
                continue  # exited meanwhile
    leaks = [(where, pw.decode()) for where, data in places for pw in needles if pw in data]
    assert not leaks, leaks


def test_the_scan_would_find_a_password(lab: dict[str, Any]) -> None:
    """The search itself works: a password written into a log file is found (the test above can fail)."""
    pw = lab["users"][0]["password"]
    probe = Path(lab["dir"]) / "logs" / "probe.log"
    probe.write_text(f"oops {pw}\n")
    try:
        found = [p for p in _files(Path(lab["dir"]) / "logs") if pw.encode() in p.read_bytes()]
        assert found == [probe]
    finally:
        probe.unlink()
