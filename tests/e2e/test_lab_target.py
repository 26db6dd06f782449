"""The lab's target stack: real Postfix and Dovecot from the repository's fragments, on loopback.

Checked as a user sees it: greetings on every port, IMAP and SMTP AUTH logins through the passdb chain,
LMTP delivery into the Maildir layout, doveadm against the instance, and nothing left running after stop.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import shutil
import smtplib
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.target_helpers import dovecot_hash, lab_dir, running_target

from sidecar.lab import proc, target
from sidecar.mta import commands, render

pytestmark = pytest.mark.e2e

ALICE = "alice@example.test"  # migrated, with a hash
ALICE_PW = "correct horse 1"
BOB = "bob@example.test"  # still copying: not in the sql passdb, reaches checkpassword


@pytest.fixture(scope="module")
def stack() -> Iterator[target.TargetStack]:
    accounts = [(ALICE, "migrated", dovecot_hash(ALICE_PW)), (BOB, "copying", None)]
    with running_target(accounts=accounts) as (_, st):
        yield st


def imap_login(st: target.TargetStack, user: str, password: str) -> imaplib.IMAP4:
    m = imaplib.IMAP4(st.host, st.imap, timeout=15)
    try:
        m.login(user, password)
    except BaseException:
        m.shutdown()
        raise
    return m


def test_to_json_describes_the_stack(stack: target.TargetStack) -> None:
    d = stack.to_json()
    assert set(d) == {"host", "imap", "pop3", "smtp", "submission", "smtps", "managesieve", "socketmap", "dashboard"}
    assert d["smtps"] == 0  # [target] smtps off: no port 465 service
    assert d["host"] == "127.0.0.3"
    assert d["socketmap"] == f"unix:{stack.dir / 'run' / 'socketmap.sock'}"
    assert d["dashboard"] is None
    assert len({d["imap"], d["pop3"], d["smtp"], d["submission"], d["managesieve"]}) == 5


def test_every_service_greets(stack: target.TargetStack) -> None:
    m = imaplib.IMAP4(stack.host, stack.imap, timeout=10)
    assert b"STARTTLS" in m.welcome or "STARTTLS" in m.capabilities
    m.logout()
    p = poplib.POP3(stack.host, stack.pop3, timeout=10)
    assert p.getwelcome().startswith(b"+OK")
    p.quit()
    with smtplib.SMTP(stack.host, stack.smtp, timeout=10) as s:
        code, _ = s.ehlo("client.test")
        assert code == 250
        assert not s.has_extn("auth"), "port 25 must not offer SMTP AUTH"
    with smtplib.SMTP(stack.host, stack.submission, timeout=10) as s:
        s.ehlo("client.test")
        assert s.has_extn("starttls")
        assert set(s.esmtp_features["auth"].upper().split()) == {"PLAIN", "LOGIN"}
    with socket.create_connection((stack.host, stack.managesieve), timeout=10) as c:
        greeting = b""
        while not re.search(rb"^OK", greeting, re.M):
            chunk = c.recv(4096)
            assert chunk, greeting
            greeting += chunk
        assert b'"IMPLEMENTATION"' in greeting and b'"SIEVE"' in greeting


def test_passdb_chain_is_sql_then_deny_then_checkpassword(stack: target.TargetStack) -> None:
    out, warnings = render.check_dovecot(stack.dovecot_config)
    assert warnings == []
    blocks = re.findall(r"^passdb \{\n(.*?)^\}", out, re.M | re.S)
    chain = [(re.search(r"driver = (\S+)", b)[1], "deny = yes" in b) for b in blocks]  # type: ignore[index]
    assert chain == [("sql", False), ("sql", True), ("checkpassword", False)]
    assert "auth_debug" not in out  # never on: it would log proxy passwords


def test_migrated_user_logs_in_with_stored_hash(stack: target.TargetStack) -> None:
    m = imap_login(stack, ALICE, ALICE_PW)
    typ, _ = m.select("INBOX")
    assert typ == "OK"
    m.logout()
    # login names are folded to lower case (auth_username_format = %Lu)
    imap_login(stack, ALICE.upper(), ALICE_PW).logout()


def test_migrated_user_wrong_password_fails(stack: target.TargetStack) -> None:
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imap_login(stack, ALICE, "an old legacy password")


def test_unmigrated_user_reaches_checkpassword(stack: target.TargetStack) -> None:
    # no sidecar runs: the shim cannot reach its socket and answers "temporary failure" (exit 111), which
    # only checkpassword can produce here (the sql steps would say AUTHENTICATIONFAILED)
    with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        imap_login(stack, BOB, "whatever")
    # and it was the shim, started by Dovecot as the dovecot user, that answered (not an exec failure)
    log = stack.logs[target.DOVECOT].read_text()
    assert f"autoport-checkpassword: sidecar at {stack.auth_socket} unreachable" in log
    assert "execv" not in log


def test_submission_auth_uses_the_same_chain(stack: target.TargetStack) -> None:
    with smtplib.SMTP(stack.host, stack.submission, timeout=15) as s:
        s.ehlo("client.test")
        code, _ = s.login(ALICE, ALICE_PW)
        assert code == 235
    with smtplib.SMTP(stack.host, stack.submission, timeout=15) as s, pytest.raises(smtplib.SMTPAuthenticationError):
        s.ehlo("client.test")
        s.user, s.password = ALICE, "an old legacy password"
        s.auth("PLAIN", s.auth_plain)  # one attempt (login() would try LOGIN too, another failure delay)


def test_lmtp_delivers_into_the_maildir_layout(stack: target.TargetStack) -> None:
    sock = stack.queue_directory / "private" / "dovecot-lmtp"
    lmtp = smtplib.LMTP(str(sock), timeout=15)
    try:
        lmtp.sendmail("sender@example.net", [ALICE], b"Subject: lmtp test\r\n\r\nhello\r\n")
    finally:
        lmtp.quit()
    new = stack.mail_root / "example.test" / "alice" / "Maildir" / "new"
    assert len(list(new.iterdir())) == 1
    m = imap_login(stack, ALICE, ALICE_PW)
    typ, data = m.select("INBOX")
    assert typ == "OK" and int(data[0] or 0) == 1
    m.logout()


def test_doveadm_works_against_the_instance(stack: target.TargetStack) -> None:
    out = subprocess.run(
        ["doveadm", "-c", str(stack.dovecot_config), "user", "-f", "home", ALICE],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    assert out.strip() == str(stack.mail_root / "example.test" / "alice")
    # the ipc socket `doveadm proxy kick` needs answers
    subprocess.run(
        ["doveadm", "-c", str(stack.dovecot_config), "proxy", "list"], capture_output=True, check=True, timeout=30
    )


def test_doveadm_reads_the_running_instances_config_socket(stack: target.TargetStack) -> None:
    """The sidecar's doveadm runs name the running Dovecot's config socket (no doveconf run per command), and
    doveadm answers through it as through the file."""
    conf = commands.running_config("doveadm", stack.dovecot_config)
    assert conf is not None and conf.endswith("/config") and stat.S_ISSOCK(os.stat(conf).st_mode)
    for command in (["proxy", "list"], ["user", "-f", "home", ALICE]):
        via_socket = commands.doveadm("doveadm", stack.dovecot_config, *command, running=True, timeout=30)
        via_file = commands.doveadm("doveadm", stack.dovecot_config, *command, timeout=30)
        assert via_socket.out.splitlines()[:1] == via_file.out.splitlines()[:1]  # a session may end meanwhile
    flushed = commands.doveadm("doveadm", stack.dovecot_config, "auth", "cache", "flush", ALICE, running=True,
                               timeout=30)  # fmt: skip
    assert re.fullmatch(r"\d+ cache entries flushed\n", flushed.out)


def test_postfix_routes_through_the_socketmap(stack: target.TargetStack) -> None:
    out = subprocess.run(
        ["postconf", "-c", str(stack.postfix_config), "-h", "transport_maps", "address_verify_transport_maps"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.split()  # fmt: skip
    assert out == [f"socketmap:{stack.socketmap}:transport", f"socketmap:{stack.socketmap}:verify"]


def test_restart_component(stack: target.TargetStack) -> None:
    old = proc.load_state(stack.dir)["pids"][target.DOVECOT]
    new = target.restart_target_component(stack.dir, "target-dovecot")
    assert new != old and not proc.pid_alive(old)
    imap_login(stack, ALICE, ALICE_PW).logout()


def test_store_failure_is_temporary_and_deny_beats_checkpassword() -> None:
    """With a stand-in checkpassword that says yes to everyone, only the store decides for migrated users."""
    accounts = [(ALICE, "migrated", dovecot_hash(ALICE_PW)), (BOB, "copying", None)]
    with running_target(accounts=accounts) as (d, st):
        fake = d / "yes-checkpassword"
        fake.write_text(
            "#!/bin/sh\n"
            "# says yes to everyone, delivers as vmail (stand-in for autoport-checkpassword)\n"
            f"USER=$(tr '\\0' '\\n' <&3 | head -n1) USERDB_UID={_uid('vmail')} USERDB_GID={_gid('vmail')}\n"
            "export USER USERDB_UID USERDB_GID\n"
            'exec "$@"\n'
        )
        fake.chmod(0o755)
        _rerender_dovecot(d, st, checkpassword_args=str(fake))
        # the stand-in is reached for a user the store does not hold as migrated ...
        imap_login(st, BOB, "anything").logout()
        # ... but never for a migrated one: the deny step stops the old password
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap_login(st, ALICE, "an old legacy password")
        # store unreadable: a temporary failure for everyone, not the stand-in's yes
        store = d / "state.db"
        store.chmod(0o600)
        os.chown(store, 0, 0)
        target.restart_target_component(d, "target-dovecot")  # auth workers keep the file open
        for user, pw in ((ALICE, ALICE_PW), (BOB, "anything")):
            with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
                imap_login(st, user, pw)


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_gid


def _rerender_dovecot(d: Path, st: target.TargetStack, **overrides: str) -> None:
    """Point the running stack's Dovecot at other variables (as a deployment would), then restart it."""
    text = st.dovecot_config.parent / "conf.d" / "10-auth.conf"
    body = text.read_text()
    current = re.search(r"driver = checkpassword\n  args = (.*)\n", body)
    assert current
    text.write_text(body.replace(current[1], overrides["checkpassword_args"]))
    target.restart_target_component(d, "target-dovecot")


def test_stop_target_leaves_no_process() -> None:
    with running_target() as (d, st):
        pids = {n: p for n, p in proc.load_state(d)["pids"].items() if p}
        assert set(pids) == {target.DOVECOT, target.POSTFIX}
        members = {m for p in pids.values() for m in proc.group_members(p)}
        assert len(members) > 2  # masters and their children (log, auth, config, qmgr, pickup, ...)
        stopped = target.stop_target(d)
        assert sorted(stopped) == sorted(pids)
        assert [m for m in members if proc.pid_alive(m)] == []
        assert not any(proc.load_state(d)["pids"].values())
        with pytest.raises(OSError):
            socket.create_connection((st.host, st.imap), timeout=2)


def test_with_sidecar_postfix_asks_its_socketmap() -> None:
    """sidecar=True: the store is initialised, `autoport serve` runs, Postfix's map lookups reach it."""
    d = lab_dir()
    try:
        st = target.start_target(d, sidecar=True, legacy={"host": "127.0.0.2", "smtp_port": 2525})
        pids = proc.load_state(d)["pids"]
        assert pids[target.SIDECAR] and proc.pid_alive(pids[target.SIDECAR])
        query = ["postmap", "-c", str(st.postfix_config), "-q", "nobody@example.test"]
        out = subprocess.run(
            [*query, f"socketmap:{st.socketmap}:transport"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        assert out.strip() == "legacy:[127.0.0.2]:2525"
        assert "[sockets]" in st.config.read_text() and st.config.stat().st_mode & 0o077 == 0
        assert sorted(target.stop_target(d)) == sorted([target.SIDECAR, target.DOVECOT, target.POSTFIX])
        assert not proc.pid_alive(pids[target.SIDECAR])
    finally:
        target.stop_target(d)
        shutil.rmtree(d, ignore_errors=True)
