"""Every concrete command line shown in README.md and docs/*.md runs on a lab (tests/harness/doc_commands.py).

Synopses (`[...]`, `a|b`, `ADDRESS...`) are parsed by tests/unit/test_doc_commands.py; commands that need a real
host are listed in doc_commands.NEEDS_HOST with the reason. Everything else runs here, in the documented order of
a lab's life (up first, restart and down last), with only these substitutions, each for a stated reason:

- `autoport` is the repository's .venv/bin/autoport, with `--config` of the lab (the documented default
  /etc/autoport/autoport.toml is a real host's);
- `doveadm` and `postmap` get `-c` with the lab's dovecot.conf / Postfix directory, the socketmap path is the
  lab's (all three: a real host's paths);
- the addresses of example.org are the lab's users (alice, bob) and domain;
- DIR, /tmp/lab and the demo's directory are fresh directories (the documented ones may be in use on a shared
  machine), NAME is `sidecar`, FILE is a hash file written for the purpose.

A command "runs" when it exits with the code listed in EXPECT (0 unless listed, with the reason), prints no
traceback and no usage error.
"""

from __future__ import annotations

import imaplib
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from harness import doc_commands
from harness.labs import make_lab_dir

from sidecar import config
from sidecar.auth import passwords
from sidecar.lab import launcher
from sidecar.states import State
from sidecar.store import open_store

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent
COMMANDS = [c for _doc, c in doc_commands.extract()]

# documented command -> exit code on a fresh lab, and why
EXPECT: dict[str, tuple[int, str]] = {
    "autoport finalize --check": (1, "a fresh lab still has accounts on the legacy server"),
}
# run only in this order: the lab must exist before the commands that use it, and go last
FIRST = ["autoport lab up --dir /tmp/lab"]
LAST = ["autoport lab restart --dir DIR NAME", "autoport lab down --dir DIR"]
OWN_LAB = {  # commands that start a lab of their own in a fresh directory (stopped afterwards)
    "autoport demo --dir DIR --keep",
    "autoport demo",
    "autoport lab up --dir DIR --nodes 2 --store postgresql",
}


def concrete(cmd: str) -> bool:
    return not any(x in cmd for x in ("[", "|", "...", "%s")) and doc_commands.strip_comment(cmd) not in (
        doc_commands.NEEDS_HOST
    )


def test_every_command_is_run_or_explained() -> None:
    for cmd in COMMANDS:
        bare = doc_commands.strip_comment(cmd)
        synopsis = any(x in bare for x in ("[", "|", "..."))
        assert concrete(cmd) or synopsis or bare in doc_commands.NEEDS_HOST or cmd in doc_commands.NEEDS_HOST, cmd


def substitute(cmd: str, lab: dict[str, Any] | None, lab_dir: Path, own_dir: Path | None = None) -> list[str]:
    text = doc_commands.strip_comment(cmd)
    lab = lab or {"users": [{"address": ""}] * 2, "config": ""}  # before the lab is up: only DIR matters
    users = lab["users"]
    if "target" in lab:
        text = text.replace("/run/autoport/socketmap.sock", lab["target"]["socketmap"].removeprefix("unix:"))
        for name, user in (("alice", users[0]), ("bob", users[1]), ("user", users[0])):
            text = text.replace(f"{name}@example.org", user["address"])
        text = text.replace("@example.org", f"@{lab['domains'][0]}")
    argv = shlex.split(text)
    out: list[str] = []
    for i, word in enumerate(argv):
        if word in ("DIR", "/tmp/lab"):
            word = str(own_dir or lab_dir)
        elif word == "NAME":
            word = "sidecar"
        elif word == "ADDRESS":
            word = users[0]["address"]  # alice: an account autoport knows (migrated by then)
        elif word == "FILE":  # a login map for import-users, a hash file (also a passwd-file) for the others
            word = str(lab_dir / ("doc-users.txt" if "import-users" in argv else "doc-hashes.txt"))
        out.append(word)
        if i == 0 and word == "autoport":
            out[0] = str(VENV_BIN / "autoport")
            if argv[1] not in ("lab", "demo"):
                out.append(f"--config={lab['config']}")
        elif i == 0 and word == "doveadm":
            out += ["-c", lab["target"]["dovecot_config"]]
        elif i == 0 and word == "postmap":
            out += ["-c", lab["target"]["postfix_config"]]
    if argv[:2] == ["autoport", "demo"] and "--dir" not in argv:
        out += ["--dir", str(own_dir)]  # the default /tmp/autoport-demo is shared on this machine
    return out


def run(argv: list[str], cmd: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=600, check=False, env=env)
    want, why = EXPECT.get(cmd, (0, ""))
    out = p.stdout + p.stderr
    assert "Traceback" not in out and "usage:" not in out, f"{cmd}: {argv}\n{out[-3000:]}"
    assert p.returncode == want, f"`{cmd}` exited {p.returncode} (expected {want}{': ' + why if why else ''})\n" \
        f"{out[-3000:]}"
    return p


@pytest.mark.timeout(600)  # three labs of its own, two demos: over 300 s on a loaded 2-core machine
def test_documented_commands_run_on_a_lab() -> None:
    lab_dir = make_lab_dir("ap-doc-")
    runnable = [c for c in COMMANDS if concrete(c)]
    assert all(c in runnable for c in FIRST + LAST), runnable
    middle = [c for c in runnable if c not in FIRST + LAST and c not in OWN_LAB]
    try:
        run(substitute(FIRST[0], None, lab_dir), FIRST[0])
        lab = launcher.lab_info(lab_dir)
        pw = passwords.hash_password("doc-test-pw", config.HashConfig(scheme="SHA512-CRYPT"))  # never in argv
        (lab_dir / "doc-hashes.txt").write_text(f"{lab['users'][1]['address']}:{pw}\n")
        bob = lab["users"][1]["address"]
        (lab_dir / "doc-users.txt").write_text(f"{bob.split('@')[0]}-login,{bob}\n")
        # the operability check is about an account autoport knows: alice logs in once (through the target)
        alice = lab["users"][0]
        with imaplib.IMAP4(lab["target"]["host"], lab["target"]["imap"], timeout=60) as c:
            c.login(alice["login"], alice["password"])
        # and is migrated (in cutover a login answers "temporary failure" for a few seconds: not a doc check)
        store = open_store(config.load(lab["config"]).store.url)
        try:
            deadline = time.monotonic() + 120
            while store.state_of(alice["address"]) is not State.MIGRATED:
                assert time.monotonic() < deadline, store.get(alice["address"])
                time.sleep(0.2)
        finally:
            store.close()
        for cmd in middle:
            # doveadm auth test reads the password, autoport passwd reads it twice: alice's own, so later checks hold
            stdin = f"{alice['password']}\n" * (1 if "auth test" in cmd else 2)
            run(substitute(cmd, lab, lab_dir), cmd, stdin=stdin)
        for cmd in LAST:
            run(substitute(cmd, lab, lab_dir), cmd)
        for cmd in sorted(OWN_LAB & set(runnable)):
            own = make_lab_dir("ap-doc2-")
            try:
                run(substitute(cmd, lab, lab_dir, own), cmd)
            finally:
                run([str(VENV_BIN / "autoport"), "lab", "down", "--dir", str(own)], "(cleanup)")
                shutil.rmtree(own, ignore_errors=True)
    finally:
        subprocess.run([str(VENV_BIN / "autoport"), "lab", "down", "--dir", str(lab_dir)], capture_output=True,
                       timeout=120, check=False)  # fmt: skip
        if not os.environ.get("AUTOPORT_KEEP_LABS"):
            shutil.rmtree(lab_dir, ignore_errors=True)
