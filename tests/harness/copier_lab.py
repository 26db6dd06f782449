"""Fixtures for the copier tests: a real legacy Dovecot (IMAP + POP3) and a real target Dovecot on loopback.

The legacy server is a plain Dovecot with a passwd-file user, in one of two namespace profiles:
"dovecot" (prefix "", separator "/") and "courier-style" (prefix "INBOX.", separator "."). The target Dovecot
uses the layout the copier writes (sidecar.migration.copier.folders.LAYOUT): maildir:~/Maildir, home MAIL_ROOT/%d/%n.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import grp
import imaplib
import os
import poplib
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import Any, Protocol

import imapclient

from harness.fakes import FakeStore as FakeStore
from harness.labs import make_lab_dir  # the copier tests use it as lab.FakeStore
from sidecar.lab.proc import free_port, free_ports, read_pidfile, stop_pid, wait_port

PASSWORD = "Legacy-pw-1"  # lab only
MASTER = "admin"
MASTER_PASSWORD = "Master-pw-1"  # lab only


def _vmail() -> tuple[int, int]:
    pw = pwd.getpwnam("vmail")
    return pw.pw_uid, pw.pw_gid


@dataclasses.dataclass
class DovecotInstance:
    root: Path
    host: str
    imap: int
    pop3: int
    pid: int
    mail_root: Path

    def stop(self) -> None:
        stop_pid(self.pid)


def _common_conf(root: Path, host: str, imap: int, pop3: int) -> str:
    uid, gid = _vmail()
    return f"""
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap pop3
listen = {host}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = 1
default_internal_user = dovecot
default_login_user = dovenull
auth_master_user_separator = *
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {host}
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
pop3_uidl_format = %08Xu%08Xv
# the tests read every message through POP3 to compare; that must not change the Seen flag
pop3_no_flag_updates = yes
"""


def _start(root: Path, conf: str, host: str, imap: int, pop3: int, mail_root: Path) -> DovecotInstance:
    for d in ("run", "state"):
        (root / d).mkdir(parents=True, exist_ok=True)
    cfg = root / "dovecot.conf"
    cfg.write_text(conf)
    log = root / "dovecot-start.log"
    with open(log, "wb") as out:
        # dovecot forks into the background; its output goes to a file so nothing waits on a pipe
        subprocess.run(["dovecot", "-c", str(cfg)], check=True, stdout=out, stderr=out, timeout=30)
    pid = read_pidfile(root / "run" / "master.pid")
    wait_port(host, imap, what="dovecot imap", log=root / "dovecot.log")
    wait_port(host, pop3, what="dovecot pop3", log=root / "dovecot.log")
    return DovecotInstance(root, host, imap, pop3, pid, mail_root)


def start_legacy(
    root: Path, address: str, profile: str = "dovecot", host: str = "127.0.0.1"
) -> DovecotInstance:
    """A legacy Dovecot with one user (`address`, PASSWORD) and a master user (MASTER, MASTER_PASSWORD)."""
    uid, gid = _vmail()
    root.mkdir(parents=True, exist_ok=True)
    mail_root = root / "mail"
    mail_root.mkdir()
    os.chown(mail_root, uid, gid)
    users = root / "users"
    users.write_text(f"{address}:{{PLAIN}}{PASSWORD}:{uid}:{gid}::{mail_root}/{address}\n")
    masters = root / "masters"
    masters.write_text(f"{MASTER}:{{PLAIN}}{MASTER_PASSWORD}\n")
    if profile == "dovecot":
        ns = "separator = /\n  prefix =\n"
        mail_location = "maildir:~/Maildir:LAYOUT=fs"
    elif profile == "courier-style":
        ns = "separator = .\n  prefix = INBOX.\n"
        mail_location = "maildir:~/Maildir"
    else:
        raise ValueError(profile)
    imap, pop3 = free_ports(host, 2)
    conf = (
        _common_conf(root, host, imap, pop3)
        + f"""
mail_location = {mail_location}
passdb {{
  driver = passwd-file
  args = {masters}
  master = yes
  pass = yes
}}
passdb {{
  driver = passwd-file
  args = {users}
}}
userdb {{
  driver = passwd-file
  args = {users}
}}
namespace inbox {{
  inbox = yes
  {ns}
  mailbox "Sent Items" {{
    special_use = \\Sent
  }}
}}
"""
    )
    return _start(root, conf, host, imap, pop3, mail_root)


def start_target(
    root: Path,
    host: str = "127.0.0.1",
    *,
    imap: int = 0,
    pop3: int = 0,
    users_file: Path | None = None,
    mail_root: Path | None = None,
) -> DovecotInstance:
    """The target Dovecot: static userdb with home MAIL_ROOT/%d/%n, maildir:~/Maildir, special folders.

    Passwords: PASSWORD for everyone, or with users_file the hashes of a legacy passwd-file (the lab legacy
    server's `users`: the users log in with the password they had). imap/pop3: fixed ports (the target taking
    over the legacy server's address), else free ones. mail_root: an existing MAIL_ROOT to serve.
    """
    uid, gid = _vmail()
    root.mkdir(parents=True, exist_ok=True)
    if mail_root is None:
        mail_root = root / "vmail"
        mail_root.mkdir()
        os.chown(mail_root, uid, gid)
    imap, pop3 = imap or free_port(host), pop3 or free_port(host)
    if users_file is None:
        passdb = f"driver = static\n  args = password={PASSWORD}"
    else:
        hashes = root / "passwd"
        lines = [":".join(line.split(":")[:2]) + "\n" for line in users_file.read_text().splitlines() if line]
        fd = os.open(hashes, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w") as f:
            f.write("".join(lines))
        os.chown(hashes, 0, grp.getgrnam("dovecot").gr_gid)
        passdb = f"driver = passwd-file\n  args = {hashes}"
    conf = (
        _common_conf(root, host, imap, pop3)
        + f"""
mail_location = maildir:~/Maildir
mail_home = {mail_root}/%d/%n
passdb {{
  {passdb}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid}
}}
namespace inbox {{
  inbox = yes
  separator = /
  prefix =
  mailbox Drafts {{
    special_use = \\Drafts
    auto = subscribe
  }}
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = subscribe
  }}
  mailbox Junk {{
    special_use = \\Junk
    auto = subscribe
  }}
  mailbox Archive {{
    special_use = \\Archive
    auto = subscribe
  }}
}}
"""
    )
    return _start(root, conf, host, imap, pop3, mail_root)


def imap_login(inst: DovecotInstance, user: str, password: str = PASSWORD) -> imaplib.IMAP4:
    c = imaplib.IMAP4(inst.host, inst.imap, timeout=10)
    c.login(user, password)
    return c


def cleanup(inst: DovecotInstance) -> None:
    inst.stop()
    shutil.rmtree(inst.root, ignore_errors=True)


# --- mail on the legacy side ----------------------------------------------------------------------------
def message(i: int, size: int = 0) -> bytes:
    """A deterministic test message; `size` pads the body to about that many bytes."""
    body = f"Message {i} body.\r\n".encode()
    if size:
        line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"
        body += line * (size // len(line) + 1)
    return (
        f"From: sender{i}@example.net\r\nTo: user@example.org\r\nSubject: test {i} \u00e4\r\n".encode()
        + f"Message-ID: <m{i}@example.net>\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\n".encode()
        + body
    )


def _client(inst: Server, user: str, password: str = PASSWORD) -> imapclient.IMAPClient:
    c = imapclient.IMAPClient(inst.host, port=inst.imap, ssl=False, timeout=15)
    c.login(user, password)
    return c


def populate(inst: DovecotInstance, user: str, profile: str, *, big: int = 0) -> list[str]:
    """Fill the legacy mailbox; returns the legacy folder names created (besides INBOX)."""
    sep, prefix = ("/", "") if profile == "dovecot" else (".", "INBOX.")
    names = [f"{prefix}Sent Items", f"{prefix}Projekte", f"{prefix}Projekte{sep}Ärger & Co", f"{prefix}Spam"]
    with _client(inst, user) as c:
        for n in names:
            c.create_folder(n)
        for n in (names[0], names[2]):
            c.subscribe_folder(n)
        c.subscribe_folder("INBOX")
        tz = dt.timezone(dt.timedelta(hours=2))
        for i in range(1, 13):
            flags: list[str] = []
            if i % 2:
                flags.append("\\Seen")
            if i % 3 == 0:
                flags.append("\\Flagged")
            if i % 4 == 0:
                flags += ["$Label1", "Projekt-X"]
            if i == 5:
                flags.append("\\Answered")
            if i == 7:
                flags.append("\\Draft")
            when = dt.datetime(2023, 1 + i % 12, 1 + i, 8, i, 0, tzinfo=tz)
            c.append("INBOX", message(i, size=big if i == 2 else 0), flags, when)
        # UID gaps: expunge 3 and 8
        c.select_folder("INBOX")
        c.delete_messages([3, 8])
        c.expunge()
        for j, n in enumerate(names):
            for k in range(1, 4 + j):
                c.append(
                    n,
                    message(100 * (j + 1) + k),
                    ["\\Seen"] if k % 2 else [],
                    dt.datetime(2022, 6, k, 12, 0, 0, tzinfo=dt.UTC),
                )
    return names


@dataclasses.dataclass
class Snapshot:
    folders: dict[str, dict[str, Any]]  # name -> {uidvalidity, uidnext, messages: {uid: (flags, date, body)}}
    subscribed: set[str]
    pop3: list[tuple[str, bytes]]  # (uidl, message) in POP3 order


class Server(Protocol):
    """Anything with an IMAP and a POP3 port on a host: DovecotInstance, sidecar.lab.legacy.LegacyServer."""

    host: str
    imap: int
    pop3: int


def snapshot(inst: Server, user: str, password: str = PASSWORD) -> Snapshot:
    """What a client sees: folders, UIDVALIDITY, UIDNEXT, per UID flags/INTERNALDATE/bytes, POP3 UIDLs."""
    folders: dict[str, dict[str, Any]] = {}
    with _client(inst, user, password) as c:
        for flags, _d, name in c.list_folders():
            if b"\\Noselect" in flags:
                continue
            info = c.select_folder(name, readonly=True)
            msgs: dict[int, tuple[frozenset[str], dt.datetime, bytes]] = {}
            if int(info[b"EXISTS"]):
                for uid, d in c.fetch(c.search("ALL"), ["FLAGS", "INTERNALDATE", "BODY.PEEK[]"]).items():
                    fl = frozenset(f.decode() for f in d[b"FLAGS"] if f != b"\\Recent")
                    msgs[uid] = (fl, d[b"INTERNALDATE"].astimezone(dt.UTC), d[b"BODY[]"])
            folders[name] = {
                "uidvalidity": int(info[b"UIDVALIDITY"]),
                "uidnext": int(info[b"UIDNEXT"]),
                "messages": msgs,
            }
        subscribed = {n for _f, _d, n in c.list_sub_folders()}
    p = poplib.POP3(inst.host, inst.pop3, timeout=15)
    try:
        p.user(user)
        p.pass_(password)
        pop: list[tuple[str, bytes]] = []
        for line in p.uidl()[1]:
            num, uidl = line.decode().split(" ", 1)
            # TOP with every line, not RETR: Dovecot sets \Seen on RETR even without QUIT (unless
            # pop3_no_flag_updates), and the lab's legacy server must stay as it was
            pop.append((uidl, b"\r\n".join(p.top(int(num), 10**9)[1])))
    finally:
        p.close()  # no QUIT: nothing committed
    return Snapshot(folders, subscribed, pop)


def lab_dir() -> Path:
    """A fresh directory Dovecot's processes (users dovecot, vmail) can traverse (pytest's tmp_path: 0700)."""
    return make_lab_dir("copier-lab-")


def private_host() -> str:
    """A loopback address of its own (127.A.B.C, A > 0): labs of other tests on 127.0.0.x never collide with
    it, and a target can take over the legacy server's exact host:port after it stopped."""
    import random

    return f"127.{random.randint(64, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"


AUTO_SUBSCRIBED = {"Drafts", "Sent", "Trash", "Junk", "Archive"}  # the target Dovecot's auto = subscribe


def assert_migrated(
    legacy: Server, target: Server, login: str, address: str, password: str, ns: tuple[str, str]
) -> None:
    """Everything a client sees is equal on both servers, legacy folder names mapped by ns = (prefix, sep)."""
    prefix, sep = ns

    def mapped(name: str) -> str:
        return name if name == "INBOX" else name.removeprefix(prefix).replace(sep, "/")

    old = snapshot(legacy, login, password)
    new = snapshot(target, address, password)
    want = {mapped(n): f for n, f in old.folders.items()}
    for extra in set(new.folders) - set(want):
        assert extra in AUTO_SUBSCRIBED and not new.folders[extra]["messages"], extra
    for name, a in want.items():
        b = new.folders[name]
        assert (b["uidvalidity"], b["uidnext"]) == (a["uidvalidity"], a["uidnext"]), name
        assert sorted(b["messages"]) == sorted(a["messages"]), name
        for uid, seen in a["messages"].items():
            assert b["messages"][uid] == seen, (name, uid)
    assert new.subscribed - AUTO_SUBSCRIBED == {mapped(n) for n in old.subscribed} - AUTO_SUBSCRIBED
    assert [uidl for uidl, _ in new.pop3] == [uidl for uidl, _ in old.pop3]
    assert new.pop3 == old.pop3


def chown_tree(root: Path) -> None:
    """Give a tree to vmail (files written by a test for a Dovecot to serve)."""
    uid, gid = _vmail()
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid)
