"""Append mode: after cutover Dovecot owns the mailbox; late legacy mail is appended with new UIDs, once.

The target Dovecot has opened and indexed the folder, an IMAP client stays connected with INBOX selected, a
message was delivered on the target (Dovecot gave it a UID), the user deleted one migrated message and
flagged another. Then legacy mail that arrived late is appended under Dovecot's uidlist lock.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import imapclient
import pytest
from harness import copier_lab as lab

from sidecar.lab import legacy
from sidecar.lab.legacy import LegacyServer, LegacyUser
from sidecar.migration.copier import CopyOptions, CopyResult, SourceParams, copy_account, target_home
from sidecar.migration.copier.maildir import LOCK, MaildirLocked
from sidecar.store.base import FolderMark

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("dovecot") is None, reason="needs dovecot")]


@dataclass
class Env:
    srv: LegacyServer
    target: lab.DovecotInstance

    def params(self, u: LegacyUser) -> SourceParams:
        return SourceParams(host=self.srv.host, user=u.login, password=u.password, imap_port=self.srv.imap)

    def copy(self, u: LegacyUser, store: lab.FakeStore, mode: Any = "initial", **kw: Any) -> CopyResult:
        home = target_home(self.target.mail_root, u.address)
        return copy_account(self.params(u), home, store, u.address, mode=mode, options=CopyOptions(**kw))

    def client(self, server: lab.Server, login: str, password: str) -> imapclient.IMAPClient:
        c = imapclient.IMAPClient(server.host, port=server.imap, ssl=False, timeout=15)
        c.login(login, password)
        return c


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    root = lab.lab_dir()
    try:
        srv = legacy.start_legacy(root / "lab", host=lab.private_host(), users=3, seed=21)
        try:
            target = lab.start_target(root / "target", srv.host, users_file=srv.dir / "users")
            try:
                yield Env(srv, target)
            finally:
                target.stop()
        finally:
            legacy.stop_legacy(root / "lab")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def late_mail(env: Env, u: LegacyUser, n: int) -> list[bytes]:
    """n messages arriving on the legacy INBOX after cutover (the last one with a keyword new there)."""
    out = []
    with env.client(env.srv, u.login, u.password) as c:
        for i in range(n):
            raw = lab.message(500 + i)
            flags = ["\\Seen"] if i % 2 else []
            if i == n - 1:
                flags.append("Spaet")
            c.append("INBOX", raw, flags, dt.datetime(2025, 3, 1 + i, 9, 0, 0, tzinfo=dt.UTC))
            out.append(raw)
    return out


def fetch_all(c: imapclient.IMAPClient) -> dict[int, tuple[frozenset[bytes], bytes]]:
    uids = c.search("ALL")
    data = c.fetch(uids, ["FLAGS", "BODY.PEEK[]"]) if uids else {}
    return {uid: (frozenset(d[b"FLAGS"]) - {b"\\Recent"}, d[b"BODY[]"]) for uid, d in data.items()}


def test_late_legacy_mail_is_appended_once_with_new_uids(env: Env) -> None:
    u = env.srv.users[0]
    store = lab.FakeStore()
    env.copy(u, store)
    with env.client(env.target, u.address, u.password) as c:
        # the target Dovecot indexes the folder; the user works on it
        c.select_folder("INBOX")
        migrated = fetch_all(c)
        uids = sorted(migrated)
        c.append("INBOX", lab.message(777), [], dt.datetime(2025, 2, 1, tzinfo=dt.UTC))  # delivered on target
        c.delete_messages([uids[1]])
        c.expunge()
        c.add_flags([uids[2]], ["\\Flagged"])
        c.noop()
        before = fetch_all(c)
        delivered_uid = max(before)
        assert delivered_uid not in migrated
        late = late_mail(env, u, 3)

        result = env.copy(u, store, "append")

        inbox = next(f for f in result.folders if f.target == "INBOX")
        assert inbox.copied == 3 and len(inbox.appended_uids) == 3
        assert min(inbox.appended_uids) > delivered_uid  # new UIDs, above what Dovecot gave out
        assert all(f.copied == 0 for f in result.folders if f.target != "INBOX")
        # the connected client sees exactly the three new messages, with their legacy flags
        c.noop()
        after = fetch_all(c)
        assert {uid: after[uid] for uid in before} == before  # existing ones untouched
        new = {uid: v for uid, v in after.items() if uid not in before}
        assert sorted(new) == inbox.appended_uids
        assert [new[uid][1] for uid in sorted(new)] == late
        assert [new[uid][0] for uid in sorted(new)] == [frozenset(), {b"\\Seen"}, {b"Spaet"}]
        assert uids[1] not in after  # deleted by the user after cutover: not brought back
    home = target_home(env.target.mail_root, u.address)
    assert not (home / "Maildir" / LOCK).exists()

    # again: nothing new on the legacy side, nothing appended
    again = env.copy(u, store, "append")
    assert again.messages_copied == 0
    with env.client(env.target, u.address, u.password) as c:
        c.select_folder("INBOX", readonly=True)
        assert fetch_all(c) == after


class CrashAfterAppend(lab.FakeStore):
    """A store that fails once when the append-mode watermark is written: the copier dies between the
    durable append and its watermark."""

    armed = False

    def set_folder_mark(self, address: str, mark: FolderMark) -> None:
        if self.armed:
            self.armed = False
            raise RuntimeError("crash after append, before the watermark")
        super().set_folder_mark(address, mark)


def test_crash_between_append_and_watermark_appends_nothing_twice(env: Env) -> None:
    u = env.srv.users[1]
    store = CrashAfterAppend()
    env.copy(u, store)
    late_mail(env, u, 2)
    store.armed = True
    with pytest.raises(RuntimeError):
        env.copy(u, store, "append")
    with env.client(env.target, u.address, u.password) as c:
        c.select_folder("INBOX", readonly=True)
        count = len(c.search("ALL"))
    result = env.copy(u, store, "append")  # the base names carry the legacy UIDs: nothing twice
    assert result.messages_copied == 0
    with env.client(env.target, u.address, u.password) as c:
        c.select_folder("INBOX", readonly=True)
        assert len(c.search("ALL")) == count
    # without any watermark (a lost store): INBOX still has the tags of the late mail (its legacy UIDs), the
    # other folders fall back to Message-ID + size; nothing twice either way
    fallback = env.copy(u, lab.FakeStore(), "append")
    assert fallback.messages_copied == 0
    for f in fallback.folders:
        assert f.matched == (0 if f.target == "INBOX" else f.messages), f
    assert sum(f.matched for f in fallback.folders) > 0


def test_uidlist_lock_is_respected_and_a_dead_holder_overridden(env: Env) -> None:
    u = env.srv.users[2]
    store = lab.FakeStore()
    env.copy(u, store)
    late_mail(env, u, 1)
    lock = target_home(env.target.mail_root, u.address) / "Maildir" / LOCK
    # held by a live process (this one): we wait, then give up with a temporary error, appending nothing
    lock.write_text(f"{os.getpid()}:{socket.gethostname()}")
    with pytest.raises(MaildirLocked):
        env.copy(u, store, "append", lock_timeout=0.5)
    assert lock.read_text() == f"{os.getpid()}:{socket.gethostname()}"
    # held by a dead process of this host: overridden at once
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = gone.pid
    lock.write_text(f"{dead}:{socket.gethostname()}")
    result = env.copy(u, store, "append", lock_timeout=0.5)
    assert result.messages_copied == 1
    assert not lock.exists()
    with env.client(env.target, u.address, u.password) as c:
        c.select_folder("INBOX", readonly=True)
        assert len(c.search("ALL")) == env.srv.plan(u).expected_counts()[()] + 1
