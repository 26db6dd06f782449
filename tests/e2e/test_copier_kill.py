"""The copier killed for real (SIGKILL, in a process of its own) mid-copy, twice, then run to the end:
the target ends equal to the legacy mailbox, no message twice, none missing, nothing left in tmp/."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import copier_lab as lab

from sidecar.lab import legacy
from sidecar.migration.copier import target_home
from sidecar.migration.copier.maildir import UIDLIST

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("dovecot") is None, reason="needs dovecot")]
REPO = Path(__file__).resolve().parents[2]


def copier(srv: legacy.LegacyServer, u: legacy.LegacyUser, home: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-m", "sidecar.migration.copier", "--host", srv.host, "--imap-port", str(srv.imap),
         "--pop3-port", str(srv.pop3), "--user", u.login, "--address", u.address, "--home", str(home),
         "--batch", "7", "--progress"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert p.stdin is not None
    p.stdin.write(u.password + "\n")  # the password on stdin, never in argv
    p.stdin.close()
    p.stdin = None  # closed: communicate() must not flush it
    return p


def kill_after(p: subprocess.Popen[str], messages: int) -> int:
    """SIGKILL the copier once it reported `messages` copied; returns how many it had reported."""
    assert p.stderr is not None and p.stdout is not None
    done = 0
    for line in p.stderr:
        if line.startswith("progress "):
            done = int(line.split()[1])
            if done >= messages:
                os.kill(p.pid, signal.SIGKILL)
                break
    p.wait(timeout=60)
    p.stderr.close()
    p.stdout.close()
    assert p.returncode == -signal.SIGKILL, "the copier finished before it could be killed"
    return done


def test_sigkill_mid_copy_then_resume() -> None:
    root = lab.lab_dir()
    try:
        srv = legacy.start_legacy(root / "lab", host=lab.private_host(), users=1, seed=9, messages_per_user=400)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    target = None
    try:
        u = srv.users[0]
        target = lab.start_target(root / "target", srv.host, users_file=srv.dir / "users")
        home = target_home(target.mail_root, u.address)
        assert kill_after(copier(srv, u, home), 60) >= 60
        assert kill_after(copier(srv, u, home), 150) >= 150
        p = copier(srv, u, home)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert 0 < json.loads(out)["messages_copied"] < 400 - 150  # the rest, not everything again
        lab.assert_migrated(srv, target, u.login, u.address, u.password, (srv.ns_prefix, srv.ns_sep))
        # on disk: every file named by the uidlist exactly once, nothing else; tmp/ empty
        maildir = home / "Maildir"
        for folder in [maildir, *[d for d in maildir.iterdir() if d.name.startswith(".") and d.is_dir()]]:
            listed = [line.split(" :", 1)[1] for line in (folder / UIDLIST).read_text().splitlines()[1:]]
            on_disk = [n.split(":2,")[0] for n in os.listdir(folder / "cur")] + os.listdir(folder / "new")
            assert sorted(listed) == sorted(on_disk), folder
            assert len(set(listed)) == len(listed)
            assert os.listdir(folder / "tmp") == []
    finally:
        if target is not None:
            target.stop()
        legacy.stop_legacy(root / "lab")
        shutil.rmtree(root, ignore_errors=True)
