"""`autoport lab up --legacy-external SPEC`: the lab's target stack in front of a server it did not start.

The "external" server here is a lab legacy server started separately (no test talks to anything outside
127.0.0.0/8); the target must verify a user's password on it and proxy the session, exactly as it would in a trial
against a copy of an administrator's real server.
"""

from __future__ import annotations

import imaplib
import json
import subprocess
from pathlib import Path

import pytest
from harness.cli import AUTOPORT

from sidecar.lab import legacy as legacy_mod
from sidecar.lab.proc import LabError

pytestmark = pytest.mark.e2e


def test_target_in_front_of_an_external_legacy_server(lab_dir: Path) -> None:
    from harness.labs import make_lab_dir

    ext_dir = make_lab_dir("ap-ext-")
    srv = legacy_mod.start_legacy(ext_dir, host="127.0.0.12", users=2, messages_per_user=5)
    try:
        users = ext_dir / "users.txt"
        users.write_text("".join(f"{u.address} {u.password}\n" for u in srv.users))
        users.chmod(0o600)
        spec = ext_dir / "legacy.toml"
        spec.write_text(
            f'host = "{srv.host}"\nimap_port = {srv.imap}\nimap_tls = "starttls"\npop3_port = {srv.pop3}\n'
            f'pop3_tls = "starttls"\nsmtp_port = {srv.smtp}\nsmtp_tls = "none"\nsubmission_port = {srv.submission}\n'
            f'sieve_port = {srv.sieve}\nsieve_tls = "none"\ntls_server_name = "{srv.tls_name}"\n'
            f'ca_file = "{srv.ca_file}"\ndomains = ["{srv.domain}"]\nusers_file = "users.txt"\n'
        )
        out = subprocess.run(
            [AUTOPORT, "lab", "up", "--dir", str(lab_dir), "--json", "--legacy-external", str(spec)],
            capture_output=True, text=True, timeout=180,
        )
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        assert info["legacy"]["external"] is True and info["legacy"]["host"] == srv.host
        assert "legacy-dovecot" not in info["pids"]  # the lab did not start (and will not stop) that server
        user = info["users"][0]
        t = info["target"]
        with imaplib.IMAP4(t["host"], t["imap"], timeout=30) as c:
            c.login(user["login"], user["password"])
            _typ, data = c.select("INBOX", readonly=True)
            assert int(data[0] or 0) > 0
        subprocess.run([AUTOPORT, "lab", "down", "--dir", str(lab_dir)], check=True, capture_output=True)
        # the external server is still up after the lab went down
        with imaplib.IMAP4(srv.host, srv.imap, timeout=10) as c:
            c.login(srv.users[0].login, srv.users[0].password)
    finally:
        legacy_mod.stop_legacy(ext_dir)


def test_external_spec_mistakes_are_named(tmp_path: Path) -> None:
    from sidecar.lab.launcher import _external_legacy

    spec = tmp_path / "legacy.toml"
    spec.write_text('host = "127.0.0.12"\ndomains = ["example.test"]\nimap_prot = 143\n')
    with pytest.raises(LabError, match="unknown key 'imap_prot'"):
        _external_legacy(str(spec))
    spec.write_text('imap_port = 143\n')
    with pytest.raises(LabError, match="needs 'host' and 'domains'"):
        _external_legacy(str(spec))
