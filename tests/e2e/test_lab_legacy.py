"""The lab's legacy server, checked the way a user's mail client and a sending MTA see it."""

from __future__ import annotations

import base64
import imaplib
import os
import poplib
import re
import smtplib
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from harness.waiting import wait_for
from imapclient import IMAPClient

from sidecar.lab import legacy, proc
from sidecar.lab.legacy import LegacyServer, LegacyUser
from sidecar.lab.mailgen import INBOX

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=legacy.PROFILES)
def srv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LegacyServer]:
    lab = tmp_path_factory.mktemp(f"legacy-{request.param}")
    server = legacy.start_legacy(lab, profile=request.param, users=3, seed=7)
    yield server
    legacy.stop_legacy(lab)


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LegacyServer]:
    lab = tmp_path_factory.mktemp("legacy-bare")
    server = legacy.start_legacy(lab, users=2, seed=3, bare_logins=True, messages_per_user=4)
    yield server
    legacy.stop_legacy(lab)


def tls_context(srv: LegacyServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(srv.ca_file))


class IMAP4SSLNamed(imaplib.IMAP4_SSL):
    """Implicit TLS to an address, verifying the certificate for another name (the legacy server moved)."""

    def __init__(self, host: str, port: int, *, tls_name: str, ssl_context: ssl.SSLContext) -> None:
        self.tls_name = tls_name
        self.verify_context = ssl_context
        super().__init__(host, port, ssl_context=ssl_context)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout)
        return self.verify_context.wrap_socket(sock, server_hostname=self.tls_name)


# Dovecot's auth penalty slows every later login from an address that failed one (as on a real legacy
# server): failing attempts come from addresses of their own so the other tests stay fast.
class IMAP4From(imaplib.IMAP4):
    def __init__(self, host: str, port: int, *, source: str) -> None:
        self.source = source
        super().__init__(host, port)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


def imap(srv: LegacyServer, user: LegacyUser) -> IMAPClient:
    c = IMAPClient(srv.host, srv.imap, ssl=False, timeout=10)
    c.normalise_times = False  # aware INTERNALDATEs
    c.login(user.login, user.password)
    return c


def wait_for_message(srv: LegacyServer, user: LegacyUser, folder: str, message_id: str) -> None:
    with imap(srv, user) as c:

        def arrived() -> bool:
            c.select_folder(folder, readonly=True)
            return bool(c.search(["HEADER", "Message-ID", message_id]))

        wait_for(arrived, 15, f"{message_id} in {folder} of {user.login}", interval=0.1)


def test_imap_plain_login_lists_generated_folders_non_ascii_in_utf7(srv: LegacyServer) -> None:
    user = srv.users[0]
    c = imaplib.IMAP4(srv.host, srv.imap)
    assert c.login(user.login, user.password)[0] == "OK"
    typ, lines = c.list()
    assert typ == "OK"
    raw = b"\n".join(x for x in lines if isinstance(x, bytes))
    name = srv.folder_name(("Entwürfe alt",)).replace("ü", "&APw-").encode()
    assert b'"' + name + b'"' in raw  # modified UTF-7 on the wire
    c.logout()
    with imap(srv, user) as ic:
        names = {n for _flags, _sep, n in ic.list_folders()}
        assert names == {srv.folder_name(f.parts) for f in srv.plan(user).folders}
        assert ic.namespace().personal[0] == (srv.ns_prefix, srv.ns_sep)
        special = {n: flags for flags, _sep, n in ic.list_folders()}
        assert b"\\Sent" in special[srv.folder_name(("Sent",))]
        assert b"\\HasChildren" in special[srv.folder_name(("Archive",))]


def test_every_users_folders_hold_the_planned_message_counts(srv: LegacyServer) -> None:
    for user in srv.users:
        counts = srv.plan(user).expected_counts()
        assert 30 <= sum(counts.values()) <= 60
        with imap(srv, user) as c:
            got = {parts: c.folder_status(srv.folder_name(parts), ["MESSAGES"])[b"MESSAGES"] for parts in counts}
        assert got == counts, user.login


def test_flags_keywords_dates_and_uid_gaps_come_out_as_generated(srv: LegacyServer) -> None:
    user = srv.users[1]
    plan = srv.plan(user)
    with imap(srv, user) as c:
        saw_gap_at_end = False
        for folder in plan.folders:
            want = {
                m.seq + 1: (set(m.flags) | set(m.keywords), m.internaldate)
                for m in plan.messages()
                if m.folder == folder.parts and not m.expunged
            }
            uidnext = max((m.seq + 2 for m in plan.messages() if m.folder == folder.parts), default=1)
            info = c.select_folder(srv.folder_name(folder.parts), readonly=True)
            assert info[b"UIDNEXT"] == uidnext
            saw_gap_at_end |= bool(want) and uidnext > max(want) + 1
            if not want:
                continue
            data = c.fetch(c.search(), ["FLAGS", "INTERNALDATE"])
            got = {uid: ({f.decode() for f in d[b"FLAGS"]}, d[b"INTERNALDATE"].timestamp()) for uid, d in data.items()}
            assert got == {uid: (fl, when.timestamp()) for uid, (fl, when) in want.items()}
        assert saw_gap_at_end  # some folder's last UID was expunged: UIDNEXT > last UID + 1
        c.select_folder("INBOX", readonly=True)
        uids = c.search("ALL")
        assert uids != list(range(1, len(uids) + 1))  # a gap from an expunge
        flags = {f for d in c.fetch(c.search(), ["FLAGS"]).values() for f in d[b"FLAGS"]}
        assert {b"\\Seen", b"\\Answered", b"\\Flagged", b"$Forwarded", b"todo"} <= flags
        c.select_folder(srv.folder_name(("Drafts",)), readonly=True)
        assert all(b"\\Draft" in d[b"FLAGS"] for d in c.fetch(c.search(), ["FLAGS"]).values())
        c.select_folder(srv.folder_name(("Junk",)), readonly=True)
        assert all(b"$Junk" in d[b"FLAGS"] for d in c.fetch(c.search(), ["FLAGS"]).values())


def test_subscriptions_cover_some_folders_only(srv: LegacyServer) -> None:
    user = srv.users[0]
    with imap(srv, user) as c:
        subscribed = {n for _f, _s, n in c.list_sub_folders()}
    want = {srv.folder_name(f.parts) for f in srv.plan(user).folders if f.subscribed}
    assert subscribed == want
    assert srv.folder_name(("Junk",)) not in subscribed
    assert srv.folder_name(("Entwürfe alt",)) in subscribed


def test_starttls_and_implicit_tls_verify_the_lab_ca_for_the_legacy_name(srv: LegacyServer) -> None:
    user = srv.users[0]
    c = imaplib.IMAP4(srv.host, srv.imap)
    c.host = srv.tls_name  # the name to verify: the server sits at a new address
    c.starttls(ssl_context=tls_context(srv))
    assert c.login(user.login, user.password)[0] == "OK"
    c.logout()

    c2 = IMAP4SSLNamed(srv.host, srv.imaps, tls_name=srv.tls_name, ssl_context=tls_context(srv))
    assert c2.login(user.login, user.password)[0] == "OK"
    assert c2.select("INBOX")[0] == "OK"
    c2.logout()

    with pytest.raises(ssl.SSLCertVerificationError):
        IMAP4SSLNamed(srv.host, srv.imaps, tls_name="other.lab.test", ssl_context=tls_context(srv))
    with pytest.raises(ssl.SSLCertVerificationError):  # not a public CA
        IMAP4SSLNamed(srv.host, srv.imaps, tls_name=srv.tls_name, ssl_context=ssl.create_default_context())


def test_pop3_user_pass_sees_inbox_count_and_uidl(srv: LegacyServer) -> None:
    user = srv.users[0]
    want = srv.plan(user).expected_counts()[INBOX]
    p = poplib.POP3(srv.host, srv.pop3, timeout=10)
    p.host = srv.tls_name
    p.stls(context=tls_context(srv))
    p.user(user.login)
    p.pass_(user.password)
    count, _size = p.stat()
    uidls = [line.split()[1].decode() for line in p.uidl()[1]]
    p.quit()
    assert count == want
    assert len(set(uidls)) == count
    if srv.profile == "courier-style":  # Courier: the Maildir base name
        assert all(re.fullmatch(r"\d+\.M\d+P\d+Q\d+\.legacy,S=\d+,W=\d+", u) for u in uidls)
    else:  # Dovecot's default %08Xu%08Xv
        assert all(re.fullmatch(r"[0-9a-f]{16}", u) for u in uidls)


def test_smtp_delivers_to_inbox_and_sieve_files_spam(srv: LegacyServer) -> None:
    user = srv.users[0]
    assert user.sieve
    mid = f"<{uuid.uuid4().hex}@test.example.net>"
    spam_mid = f"<{uuid.uuid4().hex}@test.example.net>"
    with smtplib.SMTP(srv.host, srv.smtp, timeout=10) as s:
        s.ehlo("sender.example.net")
        assert "xclient" in s.esmtp_features
        s.sendmail("someone@example.net", [user.address], f"Subject: hi\r\nMessage-ID: {mid}\r\n\r\nhello\r\n")
        s.sendmail(
            "spam@example.net",
            [user.address],
            f"Subject: win\r\nX-Spam-Flag: YES\r\nMessage-ID: {spam_mid}\r\n\r\nmoney\r\n",
        )
    wait_for_message(srv, user, "INBOX", mid)
    wait_for_message(srv, user, srv.folder_name(("Junk",)), spam_mid)  # the active Sieve script ran


def test_unknown_recipient_is_rejected_at_rcpt_with_550(srv: LegacyServer) -> None:
    with smtplib.SMTP(srv.host, srv.smtp, timeout=10) as s:
        s.ehlo("sender.example.net")
        s.mail("someone@example.net")
        code, msg = s.rcpt(f"nobody@{srv.domain}")
        assert code == 550
        assert b"5.1.1" in msg and b"User unknown" in msg
        assert s.rcpt(srv.users[1].address)[0] == 250


def test_submission_auth_accepts_the_password_and_rejects_a_wrong_one(srv: LegacyServer) -> None:
    user = srv.users[1]
    with smtplib.SMTP(srv.host, srv.submission, timeout=10) as s:
        s._host = srv.tls_name  # type: ignore[attr-defined]  # verify the certificate for this name
        s.starttls(context=tls_context(srv))
        code, _ = s.login(user.login, user.password)
        assert code == 235
    with smtplib.SMTP(srv.host, srv.submission, timeout=10, source_address=("127.0.0.62", 0)) as s:
        s.ehlo()
        s.user, s.password = user.login, user.password + "x"
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.auth("PLAIN", s.auth_plain)  # one attempt: login() would retry with LOGIN, 2 s delay each
        assert e.value.smtp_code == 535


def test_admin_master_login_both_ways(srv: LegacyServer) -> None:
    user = srv.users[2]
    want = srv.plan(user).expected_counts()[INBOX]
    c = imaplib.IMAP4(srv.host, srv.imap)
    assert c.login(f"{user.login}*{srv.admin_user}", srv.admin_password)[0] == "OK"
    assert int(c.select("INBOX", readonly=True)[1][0] or 0) == want
    c.logout()

    c = imaplib.IMAP4(srv.host, srv.imap)
    plain = f"{user.login}\0{srv.admin_user}\0{srv.admin_password}".encode()
    assert c.authenticate("PLAIN", lambda _challenge: plain)[0] == "OK"
    assert int(c.select("INBOX", readonly=True)[1][0] or 0) == want
    c.logout()

    c = IMAP4From(srv.host, srv.imap, source="127.0.0.63")
    with pytest.raises(imaplib.IMAP4.error):
        c.login(f"{user.login}*{srv.admin_user}", user.password)
    c.logout()


def _sieve_read(sock: socket.socket) -> list[str]:
    """One ManageSieve response: lines up to the final OK/NO/BYE."""
    buf = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
        if re.search(rb"(^|\r\n)(OK|NO|BYE)[^\r\n]*\r\n$", buf):
            break
    return [x for x in buf.decode().split("\r\n") if x]


def test_managesieve_lists_the_users_scripts_with_one_active(srv: LegacyServer) -> None:
    user = next(u for u in srv.users if u.sieve)
    with socket.create_connection((srv.host, srv.sieve), timeout=10) as sock:
        greeting = _sieve_read(sock)
        assert greeting[-1].startswith("OK")
        assert '"SIEVE"' in "\n".join(greeting) and '"STARTTLS"' in "\n".join(greeting)
        auth = base64.b64encode(f"\0{user.login}\0{user.password}".encode()).decode()
        sock.sendall(f'AUTHENTICATE "PLAIN" "{auth}"\r\n'.encode())
        assert _sieve_read(sock)[-1].startswith("OK")
        sock.sendall(b"LISTSCRIPTS\r\n")
        listing = _sieve_read(sock)
    assert listing[-1].startswith("OK")
    assert sorted(listing[:-1]) == ['"filters" ACTIVE', '"vacation"']


def test_state_file_rebuilds_the_server(srv: LegacyServer) -> None:
    lab = srv.dir.parent
    again = legacy.load_legacy(lab)
    assert again is not None
    assert again.to_json() == srv.to_json()
    assert proc.load_state(lab)["pids"] == {legacy.DOVECOT: srv.pids[legacy.DOVECOT],
                                            legacy.POSTFIX: srv.pids[legacy.POSTFIX]}  # fmt: skip
    assert (lab / proc.STATE_FILE).stat().st_mode & 0o077 == 0  # it holds the lab passwords


# --- bare logins, restart, stop ---------------------------------------------------------------------------


def test_bare_logins_log_in_with_the_local_part_and_receive_mail_for_the_address(bare: LegacyServer) -> None:
    user = bare.users[1]
    assert user.login == user.address.split("@")[0]
    with imap(bare, user) as c:
        assert c.folder_status("INBOX", ["MESSAGES"])[b"MESSAGES"] == bare.plan(user).expected_counts()[INBOX]
    mid = f"<{uuid.uuid4().hex}@test.example.net>"
    with smtplib.SMTP(bare.host, bare.smtp, timeout=10) as s:
        s.sendmail("someone@example.net", [user.address], f"Subject: bare\r\nMessage-ID: {mid}\r\n\r\nx\r\n")
    wait_for_message(bare, user, "INBOX", mid)
    with smtplib.SMTP(bare.host, bare.submission, timeout=10) as s:
        assert s.login(user.login, user.password)[0] == 235


def test_restart_component_comes_back_with_a_new_pid(bare: LegacyServer) -> None:
    lab = bare.dir.parent
    user = bare.users[0]
    for name in legacy.COMPONENTS:
        old = proc.load_state(lab)["pids"][name]
        new = legacy.restart_legacy_component(lab, name)
        assert new != old and proc.pid_alive(new) and not proc.pid_alive(old)
        assert proc.load_state(lab)["pids"][name] == new
    with imap(bare, user) as c:
        assert c.folder_status("INBOX", ["MESSAGES"])[b"MESSAGES"] >= 1
    with smtplib.SMTP(bare.host, bare.smtp, timeout=10) as s:
        assert s.ehlo()[0] == 250


def _pgid_members(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    out.append(int(entry))
            except ProcessLookupError:
                continue
    return out


def test_stop_leaves_no_process(bare: LegacyServer) -> None:
    lab = bare.dir.parent
    pids = proc.load_state(lab)["pids"]
    members = [p for name in legacy.COMPONENTS for p in _pgid_members(pids[name])]
    assert len(members) > 4  # masters and their children (imap-login, auth, qmgr, ...)
    legacy.stop_legacy(lab)
    assert not [p for p in members if proc.pid_alive(p)]
    pgrep = subprocess.run(["pgrep", "-f", str(lab)], capture_output=True, text=True, check=False)
    assert pgrep.stdout.strip() == ""
    assert all(proc.load_state(lab)["pids"][name] is None for name in legacy.COMPONENTS)
    with pytest.raises(OSError):
        socket.create_connection((bare.host, bare.imap), timeout=1).close()
