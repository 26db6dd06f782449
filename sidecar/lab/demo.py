"""`make demo` / `autoport demo`: a lab on loopback and a user's first login through the target, narrated.

It uses the same launcher as the tests. What it shows grows with autoport: today the legacy and target
greetings, a first IMAP login on the target with the password the user has on the legacy server (verified
there, session proxied, account created and queued for copying), and the account's status.
"""

from __future__ import annotations

import imaplib
import json
import poplib
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

from sidecar.lab import launcher


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


def run(lab_dir: Path, *, keep: bool = False) -> int:
    _say(f"starting a legacy server and a target stack on loopback in {lab_dir}")
    launcher.lab_down(lab_dir) if (lab_dir / "lab-state.json").exists() else None
    info = launcher.lab_up(lab_dir, users=3)
    try:
        launcher.print_summary(info)
        lg, tg = info["legacy"], info["target"]
        _say("greetings")
        print(f"legacy IMAP: {_greeting_imap(lg['host'], lg['imap'])}")
        print(f"target IMAP: {_greeting_imap(tg['host'], tg['imap'])}")
        print(f"target POP3: {_greeting_pop3(tg['host'], tg['pop3'])}")
        print(f"target SMTP: {_greeting_smtp(tg['host'], tg['smtp'])}")
        user: dict[str, Any] = info["users"][0]
        _say(f"{user['login']} logs in on the TARGET with the password they have on the legacy server")
        with imaplib.IMAP4(tg["host"], tg["imap"], timeout=30) as c:
            c.login(user["login"], user["password"])
            _typ, data = c.select("INBOX", readonly=True)
            uidvalidity = c.response("UIDVALIDITY")[1][0] or b"?"
            count = data[0] or b"?"
            print(f"login OK; INBOX has {count.decode()} messages, UIDVALIDITY {uidvalidity.decode()}")
            print("(the session is proxied to the legacy server until the account's mailbox is copied)")
        _say(f"autoport status {user['address']}")
        subprocess.run(
            [launcher._bin("autoport"), "--config", info["config"], "status", user["address"]], check=False
        )
        _say("autoport status (summary)")
        subprocess.run([launcher._bin("autoport"), "--config", info["config"], "status"], check=False)
        _say("operability checks")
        sm = tg["socketmap"]
        for cmd in (
            ["postmap", "-q", user["address"], f"socketmap:{sm}:transport"],
            ["postmap", "-q", f"nobody@{info['domains'][0]}", f"socketmap:{sm}:transport"],
        ):
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            print(f"$ {' '.join(cmd)}\n{out.stdout.strip() or out.stderr.strip()}")
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
