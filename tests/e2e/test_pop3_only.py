"""A legacy server that speaks only POP3 (the original product's setting), through the whole lab: the user logs
in at the target over POP3 (proxied, verified over POP3), the copier copies INBOX over POP3, and after the switch
the target lists the same UIDLs in the same order with the same messages: a POP3 client that kept its UIDLs
downloads nothing again.
"""

from __future__ import annotations

import os
import poplib
import shutil
from typing import Any

import pytest
from harness import e2e_mail
from harness.clients import fetchmail_keep

from sidecar import config
from sidecar.states import State
from sidecar.store.base import Store

pytestmark = pytest.mark.e2e


LAB = {"prefix": "ap-pop-", "users": 2, "profile": "pop3-only"}



def pop3_view(host: str, port: int, user: dict[str, Any]) -> list[tuple[str, int, bytes]]:
    """(UIDL, LIST size, whole message) in POP3 order; the session ends without QUIT (nothing committed)."""
    p = poplib.POP3(host, port, timeout=30)
    try:
        p.user(user["login"])
        p.pass_(user["password"])
        sizes = dict(line.decode().split() for line in p.list()[1])
        out = []
        for line in p.uidl()[1]:
            num, uidl = line.decode().split()
            out.append((uidl, int(sizes[num]), b"\r\n".join(p.top(int(num), 10**9)[1])))
        return out
    finally:
        p.close()


def test_pop3_only_user_migrates_with_the_same_uidls(lab: dict[str, Any], store: Store) -> None:
    lg, tg = lab["legacy"], lab["target"]
    assert lg["imap"] == 0 and lg["pop3"]
    user = lab["users"][0]
    before = pop3_view(lg["host"], lg["pop3"], user)
    assert len(before) > 5

    assert pop3_view(tg["host"], tg["pop3"], user) == before  # first login: proxied to the legacy server

    def migrated() -> bool:
        a = store.get(user["address"])
        assert a is None or a.state is not State.FAILED, store.events(user["address"])
        return a is not None and a.state is State.MIGRATED

    e2e_mail.wait_for(migrated, 90, f"{user['address']} to be migrated")
    after = pop3_view(tg["host"], tg["pop3"], user)
    assert after == before
    # a client that kept the UIDLs it saw on the legacy server finds nothing new to download
    assert {u for u, _s, _m in after} - {u for u, _s, _m in before} == set()
    account = store.get(user["address"])
    assert account is not None and account.messages_copied == len(before)


def test_pop3_copier_delta_and_sweep() -> None:
    """The copier on its own against a POP3-only legacy server: initial, delta (a new and a deleted legacy
    message), then append mode (the sweep): a new legacy message is appended with its UIDL, a message the user
    deleted on the target is not brought back."""
    import smtplib

    from harness import copier_lab as lab

    from sidecar.lab import legacy
    from sidecar.migration.copier import SourceParams, copy_account, target_home

    root = lab.lab_dir()
    try:
        srv = legacy.start_legacy(root / "lab", host=lab.private_host(), profile=legacy.POP3_ONLY, users=1, seed=5)
        target = lab.start_target(root / "target", srv.host, users_file=srv.dir / "users")
        try:
            u = srv.users[0]
            user = {"login": u.login, "password": u.password}
            tuser = {"login": u.address, "password": u.password}
            params = SourceParams(host=srv.host, user=u.login, password=u.password, imap_port=0, pop3_port=srv.pop3)
            home = target_home(target.mail_root, u.address)
            store = lab.FakeStore()
            first = copy_account(params, home, store, u.address)
            before = pop3_view(srv.host, srv.pop3, user)
            assert first.messages_copied == len(before)
            assert pop3_view(target.host, target.pop3, tuser) == before

            def deliver(subject: str) -> None:
                with smtplib.SMTP(srv.host, srv.smtp, timeout=30) as s:
                    s.sendmail("a@example.net", [u.address], f"Subject: {subject}\r\n\r\nhello\r\n".encode())

            deliver("new one")
            e2e_mail.wait_for(lambda: len(pop3_view(srv.host, srv.pop3, user)) == len(before) + 1, 30, "delivery")
            p = poplib.POP3(srv.host, srv.pop3, timeout=30)
            p.user(u.login)
            p.pass_(u.password)
            p.dele(2)
            p.quit()
            delta = copy_account(params, home, store, u.address, mode="delta")
            now = pop3_view(srv.host, srv.pop3, user)
            assert (delta.messages_copied, delta.folders[0].expunged) == (1, 1)
            assert pop3_view(target.host, target.pop3, tuser) == now

            # after the switch the mailbox is the user's: they delete the first message on the target
            p = poplib.POP3(target.host, target.pop3, timeout=30)
            p.user(u.address)
            p.pass_(u.password)
            p.dele(1)
            p.quit()
            deliver("late one")
            e2e_mail.wait_for(lambda: len(pop3_view(srv.host, srv.pop3, user)) == len(now) + 1, 30, "delivery")
            sweep = copy_account(params, home, store, u.address, mode="append")
            assert sweep.messages_copied == 1
            late = pop3_view(srv.host, srv.pop3, user)[-1]
            assert pop3_view(target.host, target.pop3, tuser) == [*now[1:], late]
            assert copy_account(params, home, store, u.address, mode="append").messages_copied == 0
        finally:
            target.stop()
            legacy.stop_legacy(root / "lab")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="needs fetchmail")
def test_fetchmail_downloads_nothing_new_after_a_pop3_only_copy() -> None:
    """fetchmail (keep, UIDL) in sync with the POP3-only legacy server; the INBOX copied over POP3; the target
    takes over the legacy server's address and port: fetchmail finds no new mail."""
    from harness import copier_lab as lab

    from sidecar.lab import legacy
    from sidecar.migration.copier import SourceParams, copy_account, target_home

    root = lab.lab_dir()
    target = None
    try:
        srv = legacy.start_legacy(root / "lab", host=lab.private_host(), profile=legacy.POP3_ONLY, users=1, seed=9)
        u = srv.users[0]
        inbox = srv.plan(u).expected_counts()[()]
        rc, fetched, log = fetchmail_keep(root / "fm", srv.host, srv.pop3, u.login, u.password)
        assert (rc, fetched) == (0, inbox), log
        mail_root = root / "vmail"
        mail_root.mkdir(mode=0o755)
        os.chown(mail_root, *lab._vmail())
        params = SourceParams(host=srv.host, user=u.login, password=u.password, imap_port=0, pop3_port=srv.pop3)
        copy_account(params, target_home(mail_root, u.address), lab.FakeStore(), u.address)
        legacy.stop_legacy(root / "lab")
        target = lab.start_target(
            root / "target", srv.host, pop3=srv.pop3, users_file=srv.dir / "users", mail_root=mail_root
        )
        rc, fetched, log = fetchmail_keep(root / "fm", srv.host, srv.pop3, u.login, u.password)
        assert (rc, fetched) == (1, inbox), log  # fetchmail exit 1: no new mail
    finally:
        if target is not None:
            target.stop()
        legacy.stop_legacy(root / "lab")
        shutil.rmtree(root, ignore_errors=True)


def test_doctor_on_a_pop3_only_legacy_server(lab: dict[str, Any]) -> None:
    """imap_port = 0 is a POP3-only legacy server, not a problem; with IMAP configured but absent, doctor says
    what to set."""
    import dataclasses

    from sidecar.ops import doctor

    cfg = config.load(lab["config"])
    assert cfg.legacy.imap_port == 0
    assert [f for f in doctor.check_legacy(cfg) if f.status == doctor.PROBLEM] == []
    from sidecar.lab.proc import free_port

    nobody = free_port(lab["legacy"]["host"])  # nothing listens there
    closed = dataclasses.replace(cfg, legacy=dataclasses.replace(cfg.legacy, imap_port=nobody))
    notes = [f for f in doctor.run(closed) if f.check == "legacy" and f.status == doctor.NOTE]
    assert any("imap_port = 0" in f.message for f in notes), notes
