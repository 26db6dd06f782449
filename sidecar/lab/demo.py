"""`make demo` / `autoport demo`: a lab on loopback and a user's first login through the target, narrated.

It uses the same launcher as the tests. What it shows grows with autoport: today the legacy and target
greetings, a first IMAP login on the target with the password the user has on the legacy server (verified
there, session proxied, account created and queued for copying), and the account's status.
"""

from __future__ import annotations

import imaplib
import json
import poplib
import shutil
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from sidecar.lab import launcher
from sidecar.lab.info import LabUser


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _greeting_imap(host: str, port: int) -> str:
    with imaplib.IMAP4(host, port, timeout=10) as c:
        return c.welcome.decode(errors="replace")


def _greeting_pop3(host: str, port: int) -> str:
    p = poplib.POP3(host, port, timeout=10)
    try:
        return p.getwelcome().decode(errors="replace")
    finally:
        p.quit()


def _greeting_smtp(host: str, port: int) -> str:
    with smtplib.SMTP(host, port, timeout=10) as s:
        code, msg = s.noop()
        return f"{s.sock.getpeername() if s.sock else ''} {code} {msg.decode(errors='replace')}"


_DEMO_MAIL = """From: someone@elsewhere.test
To: {to}
Subject: sent during the migration
Message-ID: <demo-during-migration@elsewhere.test>

This message arrived while the mailbox was being moved. It is delivered exactly once.
"""


def _inbox(host: str, port: int, user: LabUser) -> tuple[str, int]:
    with imaplib.IMAP4(host, port, timeout=30) as c:
        c.login(user["login"], user["password"] or "")
        _typ, data = c.select("INBOX", readonly=True)
        uidvalidity = (c.response("UIDVALIDITY")[1][0] or b"?").decode()
        return uidvalidity, int(data[0] or 0)


def _follow(config: str, address: str, timeout: float = 120) -> str:
    """Print the account's state changes until it settles; return the final state."""
    from sidecar import config as config_mod
    from sidecar.store import open_store

    cfg = config_mod.load(config)
    store = open_store(cfg.store.url)
    seen = ""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            account = store.get(address)
            state = account.state.value if account else "(none)"
            if state != seen:
                extra = f" ({account.messages_copied}/{account.messages_total} messages)" if account else ""
                print(f"  {time.strftime('%H:%M:%S')}  {address}: {state}{extra}", flush=True)
                seen = state
            if state in ("migrated", "failed"):
                return state
            time.sleep(0.2)
    finally:
        store.close()
    return seen


def _wait_for_count(host: str, port: int, user: LabUser, count: int, timeout: float = 30) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        got = _inbox(host, port, user)
        if got[1] >= count or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def run(lab_dir: Path, *, keep: bool = False) -> int:
    _say(f"starting a legacy server and a target stack on loopback in {lab_dir}")
    if (lab_dir / "lab-state.json").exists():  # an earlier demo's lab: start from scratch
        launcher.lab_down(lab_dir)
        shutil.rmtree(lab_dir)
    elif lab_dir.exists() and any(lab_dir.iterdir()):
        print(f"{lab_dir} exists and is not a lab directory; choose another with --dir", file=sys.stderr)
        return 2
    info = launcher.lab_up(lab_dir, users=3)
    try:
        launcher.print_summary(info)
        lg, tg = info["legacy"], info["target"]
        _say("greetings")
        print(f"legacy IMAP: {_greeting_imap(lg['host'], lg['imap'] or 143)}")
        print(f"target IMAP: {_greeting_imap(tg['host'], tg['imap'])}")
        print(f"target POP3: {_greeting_pop3(tg['host'], tg['pop3'])}")
        print(f"target SMTP: {_greeting_smtp(tg['host'], tg['smtp'])}")
        user = info["users"][0]
        _say(f"{user['login']} logs in on the TARGET with the password they have on the legacy server")
        before = _inbox(tg["host"], tg["imap"], user)
        print(f"login OK; INBOX has {before[1]} messages, UIDVALIDITY {before[0]}")
        print("(verified on the legacy server, hash stored, session proxied there, copy queued)")
        _say("mail to the user while the copy runs: relayed to the legacy server, or held during cutover")
        with smtplib.SMTP(tg["host"], tg["smtp"], timeout=30) as s:
            s.sendmail("someone@elsewhere.test", [user["address"]], _DEMO_MAIL.format(to=user["address"]).encode())
        print("250 accepted by the target's Postfix")
        _say("the job runner copies the mailbox, holds mail for the final delta, then switches the account")
        state = _follow(info["config"], user["address"])
        if state != "migrated":
            raise RuntimeError(f"account ended in state {state}")
        after = _wait_for_count(tg["host"], tg["imap"], user, before[1] + 1)
        print(f"native login OK; INBOX has {after[1]} messages, UIDVALIDITY {after[0]} (unchanged: no re-download)")
        _say(f"autoport status {user['address']}")
        subprocess.run(
            [launcher._bin("autoport"), "--config", info["config"], "status", user["address"]], check=False
        )
        _say("autoport status (summary)")
        subprocess.run([launcher._bin("autoport"), "--config", info["config"], "status"], check=False)
        _say("operability checks")
        sm = tg["socketmap"]
        for cmd in (
            ["postmap", "-c", tg["postfix_config"], "-q", user["address"], f"socketmap:{sm}:transport"],
            ["postmap", "-c", tg["postfix_config"], "-q", info["users"][1]["address"], f"socketmap:{sm}:transport"],
            ["doveadm", "-c", tg["dovecot_config"], "user", user["address"]],
        ):
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            print(f"$ {' '.join(cmd)}\n{out.stdout.strip() or out.stderr.strip()}")
        _say("autoport report: what is left before the legacy server can be retired")
        subprocess.run([launcher._bin("autoport"), "--config", info["config"], "report"], check=False)
    except Exception as e:
        print(f"demo failed: {e}", file=sys.stderr)
        print(f"logs: {info['logs']}", file=sys.stderr)
        launcher.lab_down(lab_dir)
        return 1
    if keep:
        _say("the lab keeps running; stop it with:")
        print(f"autoport lab down --dir {lab_dir}")
        print(json.dumps({"target": info["target"]}, indent=None))
    else:
        _say("stopping the lab")
        launcher.lab_down(lab_dir)
    return 0
