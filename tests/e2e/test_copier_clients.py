"""Real mail clients across a migration: fetchmail (POP3, UIDL) and mbsync (IMAP) see nothing new afterwards.

As in a real migration the new server takes over the old one's address: both clients sync against the lab's
legacy server, the mailboxes are copied, the legacy server stops, and the target Dovecot starts on the same
host and ports serving what the copier wrote. fetchmail keys its UIDL memory by server name and user, mbsync
its state by UIDVALIDITY and UID: had either changed, they would download everything again.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import imapclient
import pytest
from harness import copier_lab as lab
from harness.clients import fetchmail_keep

from sidecar.lab import legacy
from sidecar.lab.legacy import LegacyServer, LegacyUser
from sidecar.migration.copier import SourceParams, copy_account, target_home

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("dovecot") is None, reason="needs dovecot"),
    pytest.mark.skipif(shutil.which("fetchmail") is None, reason="needs fetchmail"),
    pytest.mark.skipif(shutil.which("mbsync") is None, reason="needs mbsync (isync)"),
]


@dataclass
class Migration:
    root: Path
    srv: LegacyServer
    target: lab.DovecotInstance | None = None


def fetchmail(m: Migration, u: LegacyUser) -> tuple[int, int, str]:
    """One fetchmail run in keep mode with UIDL tracking; (exit code, messages in the bsmtp file, log)."""
    # fetchmail's own configuration holds the password (it has no other way): mode 0600, in the test's dir
    return fetchmail_keep(m.root / "fetchmail", m.srv.host, m.srv.pop3, u.login, u.password)


def mbsync(m: Migration, u: LegacyUser) -> tuple[int, str]:
    """One mbsync run (far: the server, near: a local Maildir), all folders; (exit code, output)."""
    d = m.root / "mbsync"
    (d / "mail").mkdir(parents=True, exist_ok=True)
    rc = d / "mbsyncrc"
    rc.write_text(
        "IMAPAccount server\n"
        f"Host {m.srv.host}\nPort {m.srv.imap}\nUser {u.login}\n"
        # the password comes from the environment, not from this file
        'PassCmd "printenv MBSYNC_PASSWORD"\nSSLType None\nAuthMechs LOGIN\n\n'
        "IMAPStore far\nAccount server\n\n"
        f"MaildirStore near\nPath {d}/mail/\nInbox {d}/mail/INBOX\nSubFolders Verbatim\n\n"
        "Channel all\nFar :far:\nNear :near:\nPatterns *\nCreate Near\nSyncState *\n"
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(d), "MBSYNC_PASSWORD": u.password}
    p = subprocess.run(
        ["mbsync", "-c", str(rc), "-V", "all"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    return p.returncode, p.stdout + p.stderr


def mbsync_local(m: Migration) -> tuple[dict[str, int], dict[str, str]]:
    """Per local folder: message files, and the far UIDVALIDITY mbsync recorded in its state."""
    files: dict[str, int] = {}
    validity: dict[str, str] = {}
    for state in (m.root / "mbsync" / "mail").rglob(".mbsyncstate"):
        folder = state.parent
        name = str(folder.relative_to(m.root / "mbsync" / "mail"))
        files[name] = sum(len(os.listdir(folder / sub)) for sub in ("cur", "new"))
        head = state.read_text().split("\n\n", 1)[0]
        match = re.search(r"^FarUidValidity (\d+)", head, re.MULTILINE)
        assert match, head
        validity[name] = match.group(1)
    return files, validity


@pytest.fixture(scope="module")
def migration() -> Iterator[Migration]:
    root = lab.lab_dir()
    try:
        m = Migration(root, legacy.start_legacy(root / "lab", host=lab.private_host(), users=2, seed=5))
        try:
            yield m
        finally:
            if m.target is not None:
                m.target.stop()
            legacy.stop_legacy(root / "lab")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_clients_see_nothing_new_after_the_new_server_took_over(migration: Migration) -> None:
    m = migration
    pop_user, imap_user = m.srv.users
    inbox = m.srv.plan(pop_user).expected_counts()[()]
    # before: the users' clients are in sync with the legacy server
    rc, fetched, log = fetchmail(m, pop_user)
    assert (rc, fetched) == (0, inbox), log
    rc, log = mbsync(m, imap_user)
    assert rc == 0, log
    files_before, validity_before = mbsync_local(m)
    assert sum(files_before.values()) == m.srv.plan(imap_user).count

    # the migration: copy, stop the legacy server, the target takes over its address
    mail_root = m.root / "vmail"
    mail_root.mkdir(mode=0o755)
    os.chown(mail_root, *lab._vmail())
    for u in (pop_user, imap_user):
        params = SourceParams(
            host=m.srv.host, user=u.login, password=u.password, imap_port=m.srv.imap, pop3_port=m.srv.pop3
        )
        copy_account(params, target_home(mail_root, u.address), lab.FakeStore(), u.address)
    legacy.stop_legacy(m.root / "lab")
    m.target = lab.start_target(
        m.root / "target", m.srv.host, imap=m.srv.imap, pop3=m.srv.pop3, users_file=m.srv.dir / "users",
        mail_root=mail_root,
    )  # fmt: skip

    # after: nothing to download, nothing changed
    rc, fetched, log = fetchmail(m, pop_user)
    assert (rc, fetched) == (1, inbox), log  # fetchmail exit 1: no new mail
    assert "UIDVALIDITY" not in log
    rc, log = mbsync(m, imap_user)
    assert rc == 0, log
    assert "UIDVALIDITY" not in log.upper(), log
    files_after, validity_after = mbsync_local(m)
    assert files_after == files_before
    assert validity_after == validity_before

    # and both still see mail that arrives on the new server: exactly the one new message
    for u in (pop_user, imap_user):
        with imapclient.IMAPClient(m.srv.host, port=m.srv.imap, ssl=False, timeout=15) as c:
            c.login(u.address, u.password)
            c.append("INBOX", lab.message(900), [], dt.datetime(2025, 1, 2, tzinfo=dt.UTC))
    rc, fetched, log = fetchmail(m, pop_user)
    assert (rc, fetched) == (0, inbox + 1), log
    rc, log = mbsync(m, imap_user)
    assert rc == 0, log
    files_new, _ = mbsync_local(m)
    assert files_new == {**files_before, "INBOX": files_before["INBOX"] + 1}
