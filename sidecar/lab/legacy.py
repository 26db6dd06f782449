"""The lab's legacy mail server: a Dovecot + Postfix pair on loopback standing in for Exchange, Courier, Cyrus...

More (the reasons and limits behind this module): docs/modules.md, sidecar/lab/legacy.py.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import random
import shutil
import stat
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from sidecar.lab import mailgen, proc, tlsgen
from sidecar.lab.proc import LabError

PROFILES = ("dovecot", "courier-style")  # IMAP and POP3, two namespaces (tests run per profile)
POP3_ONLY = "pop3-only"
ALL_PROFILES = (*PROFILES, POP3_ONLY)
TLS_NAME = "legacy.lab.test"
ADMIN_USER = "admin"
OTHER_DOMAIN = "other.test"  # a second legacy domain the target does not serve (issue 14)
DOVECOT = "legacy-dovecot"
POSTFIX = "legacy-postfix"
COMPONENTS = (DOVECOT, POSTFIX)
STATE_KEY = "legacy"
MESSAGE_SIZE_LIMIT = 26214400  # the lab legacy Postfix's SIZE: above Postfix's default, as many servers set it
_NAMES = (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
    "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "wendy",
)  # fmt: skip
_SOCKET_ROOM = 40  # longest socket name Dovecot makes under base_dir, with margin; sun_path holds 107 bytes
_PW_ALPHABET = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"


@dataclass
class LegacyUser:
    address: str  # alice@example.test
    login: str  # what the user types on the legacy server: address, or bare local part with bare_logins
    password: str  # generated from the seed; lab records only
    sieve: bool  # has Sieve scripts ("filters" active, "vacation" inactive)


@dataclass
class LegacyServer:
    dir: Path  # lab_dir/legacy
    host: str
    imap: int
    imaps: int
    pop3: int
    pop3s: int
    smtp: int
    submission: int
    sieve: int
    lmtp: int
    admin_user: str
    admin_password: str
    users: list[LegacyUser]
    profile: str
    ca_file: Path
    tls_name: str
    pids: dict[str, int]  # "legacy-dovecot", "legacy-postfix"
    domain: str = "example.test"
    seed: int = 1
    messages_per_user: int | None = None
    bare_logins: bool = False
    ns_prefix: str = ""
    ns_sep: str = "/"
    logs: dict[str, Path] = field(default_factory=dict)
    smtps: int = 0  # SMTP AUTH with implicit TLS (465 on a real server)
    message_size_limit: int = 0  # the SIZE its Postfix announces
    # issue 14, outside `users` (tests count those): "other" (alice@other.test, a domain the target does not
    # serve, same local part as users[0]), "jsmith" (login jsmith, address john.smith@DOMAIN), "nonascii"
    # (zoe@DOMAIN, password with non-ASCII characters, quotes and a backslash; has a mailbox)
    extra_users: dict[str, LegacyUser] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["dir"] = str(self.dir)
        d["ca_file"] = str(self.ca_file)
        d["logs"] = {k: str(v) for k, v in self.logs.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LegacyServer:
        d = dict(d)
        d["dir"] = Path(d["dir"])
        d["ca_file"] = Path(d["ca_file"])
        d["logs"] = {k: Path(v) for k, v in d.get("logs", {}).items()}
        d["users"] = [LegacyUser(**u) for u in d["users"]]
        d["extra_users"] = {k: LegacyUser(**u) for k, u in d.get("extra_users", {}).items()}
        return cls(**d)

    def legacy_config(self) -> dict[str, Any]:
        """The target's [legacy] section for this server: its ports and TLS modes, its CA, its master login."""
        return {
            "host": self.host,
            "imap_port": self.imap,
            "imap_tls": "starttls",
            "pop3_port": self.pop3,
            "pop3_tls": "starttls",
            "smtp_port": self.smtp,
            "smtp_tls": "none",
            "submission_port": self.submission,
            "submission_tls": "starttls",
            "smtps_port": self.smtps,
            "sieve_port": self.sieve,
            "sieve_tls": "none",
            "tls_verify": True,
            "tls_server_name": self.tls_name,
            "ca_file": str(self.ca_file),
            "admin_user": self.admin_user,
            "admin_password": self.admin_password,
            "admin_mode": "master",
            # the legacy server knows bare names when bare_logins: ask it for the part before @ (issue 14)
            "login_template": "%n" if self.bare_logins else "%u",
        }

    def user(self, name: str) -> LegacyUser:
        """A user by address, login or local part."""
        for u in self.users:
            if name in (u.address, u.login, u.address.split("@", 1)[0]):
                return u
        raise KeyError(name)

    def plan(self, user: LegacyUser) -> mailgen.MailboxPlan:
        """What the user's mailbox was filled with (regenerated from the seed)."""
        return mailgen.MailboxPlan.make(user.address, self.seed, self.messages_per_user)

    def folder_name(self, parts: tuple[str, ...]) -> str:
        """A folder's IMAP name (Unicode) on this server: ("Archive", "2023") -> "Archive/2023" or
        "INBOX.Archive.2023"."""
        return "INBOX" if not parts else self.ns_prefix + self.ns_sep.join(parts)


def _ns(profile: str) -> tuple[str, str, str]:
    """(namespace prefix, separator, pop3_uidl_format) of a profile."""
    if profile == "dovecot":
        return "", "/", "%08Xu%08Xv"
    if profile == "courier-style":
        return "INBOX.", ".", "%f"
    if profile == POP3_ONLY:
        return "", "/", "%08Xu%08Xv"
    raise ValueError(f"unknown legacy profile {profile!r} (choose from {', '.join(ALL_PROFILES)})")


def make_traversable(path: Path) -> None:
    """Let the dovecot, dovenull and postfix users reach sockets and files under path.

    path itself gets mode 0755; its ancestors below /tmp get o+x (pytest makes them 0700). An ancestor
    elsewhere that others cannot traverse is an error naming it.
    """
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)  # noqa: S103 - daemons running as other users must traverse it
    tmp = Path("/tmp")  # noqa: S108 - only to recognise pytest's private temporary directories
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if mode & stat.S_IXOTH:
            continue
        if tmp in parent.parents:
            os.chmod(parent, stat.S_IMODE(mode) | stat.S_IXGRP | stat.S_IXOTH)  # noqa: S103 - traverse only
        else:
            raise LabError(f"{parent} is not traversable by the mail daemons' users (needs o+x)")


def _password(seed: int, who: str) -> str:
    rng = random.Random(f"password:{seed}:{who}")  # noqa: S311 - lab passwords, reproducible on purpose
    return "".join(rng.choice(_PW_ALPHABET) for _ in range(16))


def _sha512_crypt(passwords: list[str]) -> list[str]:
    """SHA512-CRYPT hashes, passwords fed on stdin (never argv): `openssl passwd -6 -stdin`, one process."""
    if not passwords:
        return []
    p = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],
        input="".join(pw + "\n" for pw in passwords),
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    hashes = p.stdout.split()
    if p.returncode != 0 or len(hashes) != len(passwords) or not all(h.startswith("$6$") for h in hashes):
        raise LabError(f"openssl passwd -6 failed: {p.stderr.strip()[-500:]}")
    return ["{SHA512-CRYPT}" + h for h in hashes]


def _render(name: str, **values: Any) -> str:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("sidecar.lab", "templates/legacy"),
        autoescape=jinja2.select_autoescape(enabled_extensions=(), default_for_string=False, default=False),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template(name).render(**values)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file atomically (write, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)



def load_legacy(lab_dir: Path) -> LegacyServer | None:
    """The legacy server recorded in lab_dir/lab-state.json, or None."""
    d = proc.load_state(lab_dir).get(STATE_KEY)
    return LegacyServer.from_json(d) if d else None


def _running(lab_dir: Path) -> list[str]:
    pids = proc.load_state(lab_dir).get("pids", {})
    return [n for n in COMPONENTS if pids.get(n) and proc.pid_alive(int(pids[n]))]


def start_legacy(
    lab_dir: Path,
    *,
    host: str = "127.0.0.2",
    profile: str = "dovecot",
    users: int = 5,
    domain: str = "example.test",
    seed: int = 1,
    bare_logins: bool = False,
    messages_per_user: int | None = None,
    shared_folders: bool = False,
    identity_users: bool = False,
) -> LegacyServer:
    """Create, fill and start the legacy server under lab_dir/legacy (replacing an earlier, stopped one).

    The admin lists every account in the other-users namespace "user/" (profile dovecot; courier-style has none:
    its "." separator cannot hold an address). shared_folders adds what a personal mailbox must never take in:
    a public namespace "Public/" with a folder "Announcements" (one message) readable by everyone, and the
    second user's "Archive" shared with the first user (seen by them as "user/BOB/Archive"). identity_users adds
    the accounts of the login-identity tests (LegacyServer.extra_users): alice of a domain the target does not
    serve, jsmith (login) for john.smith (address), zoe with a non-ASCII password.
    """
    prefix, sep, uidl_format = _ns(profile)
    lab_dir = lab_dir.resolve()
    if running := _running(lab_dir):
        raise LabError(f"legacy server already running in {lab_dir} ({', '.join(running)}); stop it first")
    make_traversable(lab_dir)
    ldir = lab_dir / "legacy"
    logs = lab_dir / "logs"
    base_dir = ldir / "run"
    if len(str(base_dir)) + _SOCKET_ROOM > 107:
        raise LabError(f"lab directory {lab_dir} is too long for UNIX socket paths; use a shorter one")
    if ldir.exists():
        shutil.rmtree(ldir)
    for d in (ldir, logs, ldir / "postfix", ldir / "mail"):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # noqa: S103 - read by the dovecot and postfix users

    ca = tlsgen.ensure_ca(lab_dir / "tls")
    cert = tlsgen.issue_cert(ca, TLS_NAME)  # name only: the legacy server moved, clients verify its name
    vmail = pwd.getpwnam("vmail")
    owner = (vmail.pw_uid, vmail.pw_gid)

    # users, passwords, mailboxes
    names = [_NAMES[i] if i < len(_NAMES) else f"user{i:03d}" for i in range(users)]
    lusers = [
        LegacyUser(
            address=f"{n}@{domain}",
            login=n if bare_logins else f"{n}@{domain}",
            password=_password(seed, f"{n}@{domain}"),
            sieve=i % 2 == 0,
        )
        for i, n in enumerate(names)
    ]
    extras = {} if not identity_users else {
        "other": LegacyUser(f"alice@{OTHER_DOMAIN}", f"alice@{OTHER_DOMAIN}", _password(seed, "other"), False),
        "jsmith": LegacyUser(f"john.smith@{domain}", "jsmith", _password(seed, "jsmith"), False),
        "nonascii": LegacyUser(
            f"zoe@{domain}", "zoe" if bare_logins else f"zoe@{domain}",
            "Zö€\"q'\\-" + _password(seed, "zoe")[:8], False,
        ),
    }
    admin_password = _password(seed, ADMIN_USER)
    all_users = [*lusers, *extras.values()]
    hashes = _sha512_crypt([u.password for u in all_users] + [admin_password])
    user_lines = []
    expected: dict[str, Any] = {}
    for u, h in zip(all_users, hashes[:-1], strict=True):
        home = ldir / "mail" / u.login
        home.mkdir(mode=0o700)
        if u in (extras.get("other"), extras.get("jsmith")):  # no mail: they exist for login checks only
            mailgen.chown_tree(home, owner)
            user_lines.append(f"{u.login}:{h}:{owner[0]}:{owner[1]}::{home}::\n")
            continue
        plan = mailgen.MailboxPlan.make(u.address, seed, messages_per_user)
        result = mailgen.write_maildir(
            plan, home / "Maildir", pop3_order="own" if profile == "courier-style" else "uid"
        )
        expected[u.login] = {
            _folder_name(prefix, sep, parts): {
                "uidvalidity": wf.uidvalidity,
                "uidnext": wf.uidnext,
                "subscribed": wf.subscribed,
                "messages": [
                    [m.uid, m.message_id, [*m.flags, *m.keywords], m.internaldate, m.size] for m in wf.messages
                ],
            }
            for parts, wf in result.folders.items()
        }
        if u.sieve and profile != POP3_ONLY:
            _write_sieve(home, mailgen.sieve_scripts(plan, lambda p: _folder_name(prefix, sep, p)))
        mailgen.chown_tree(home, owner)
        user_lines.append(f"{u.login}:{h}:{owner[0]}:{owner[1]}::{home}::\n")
    _write(ldir / "users", "".join(user_lines), 0o640)
    _write(ldir / "master-users", f"{ADMIN_USER}:{hashes[-1]}\n", 0o640)
    admin_home = ldir / "admin"
    admin_home.mkdir(mode=0o700)
    os.chown(admin_home, *owner)
    _write(ldir / "admin-user", f"{ADMIN_USER}:{hashes[-1]}:{owner[0]}:{owner[1]}::{admin_home}::\n", 0o640)
    for f in ("users", "master-users", "admin-user"):
        os.chown(ldir / f, 0, _gid("dovecot"))
    # ACLs: owners keep every right, the admin may look up and read everything (the account listing)
    _write(ldir / "global-acl", f"* owner lrwstipekxa\n* user={ADMIN_USER} lr\n")
    (ldir / "acl").mkdir(mode=0o700)
    os.chown(ldir / "acl", *owner)
    public_dir = ""
    if shared_folders:
        public_dir = str(_write_shared_folders(ldir, lusers, owner, sep))
    _write(ldir / "mailboxes.json", json.dumps(expected, indent=1, ensure_ascii=False), 0o600)

    port_names = ("imap", "imaps", "pop3", "pop3s", "smtp", "submission", "sieve", "lmtp", "smtps")
    ports = dict(zip(port_names, proc.free_ports(host, len(port_names)), strict=True))
    protocols = "imap pop3 lmtp sieve"
    if profile == POP3_ONLY:
        ports |= {"imap": 0, "imaps": 0, "sieve": 0}
        protocols = "pop3 lmtp"
    dh = Path("/usr/share/dovecot/dh.pem")
    _write(
        ldir / "dovecot.conf",
        _render(
            "dovecot.conf.j2",
            profile=profile,
            protocols=protocols,
            instance=f"legacy-{ports['pop3']}",
            base_dir=base_dir,
            state_dir=ldir / "state",
            log=logs / "legacy-dovecot.log",
            host=host,
            cert=cert.cert_file,
            key=cert.key_file,
            dh=dh if dh.exists() else "",
            vmail_uid=owner[0],
            pop3_uidl_format=uidl_format,
            ns_prefix=prefix,
            ns_sep=sep,
            master_users=ldir / "master-users",
            users=ldir / "users",
            domain=domain,
            bare_logins=bare_logins,
            admin_user_file=ldir / "admin-user",
            users_namespace=profile == "dovecot",
            public_dir=public_dir,
            global_acl=ldir / "global-acl",
            acl_dict=ldir / "acl" / "shared-mailboxes.db",
            **ports,
        ),
    )
    (ldir / "state").mkdir(mode=0o755)
    pfx = ldir / "postfix"
    _write(pfx / "vmailbox", "".join(f"{u.address} {u.login}/Maildir/\n" for u in all_users
                                     if u.address.endswith("@" + domain)))
    _write(
        pfx / "main.cf",
        _render(
            "main.cf.j2",
            queue_dir=ldir / "postfix-queue",
            data_dir=ldir / "postfix-data",
            tls_name=TLS_NAME,
            host=host,
            domain=domain,
            vmailbox=pfx / "vmailbox",
            lmtp=ports["lmtp"],
            sasl_path=base_dir / "auth-postfix",
            cert=cert.cert_file,
            key=cert.key_file,
            log=logs / "legacy-postfix.log",
            log_dir=logs,
            message_size_limit=MESSAGE_SIZE_LIMIT,
        ),
    )
    _write(pfx / "master.cf", _render("master.cf.j2", host=host, smtp=ports["smtp"],
                                      submission=ports["submission"], smtps=ports["smtps"]))  # fmt: skip
    # Postfix re-reads a table or main.cf modified within the last 2 s, sleeping 300 ms each time (against
    # half-written files): a fresh config cost 2 s at start-up. Ours are written atomically, so date them back.
    past = time.time() - 10
    for f in ("main.cf", "master.cf", "vmailbox"):
        os.utime(pfx / f, (past, past))
    (ldir / "postfix-queue").mkdir(mode=0o755)
    (ldir / "postfix-data").mkdir(mode=0o700)
    os.chown(ldir / "postfix-data", pwd.getpwnam("postfix").pw_uid, _gid("postfix"))

    srv = LegacyServer(
        dir=ldir,
        host=host,
        admin_user=ADMIN_USER,
        admin_password=admin_password,
        users=lusers,
        extra_users=extras,
        profile=profile,
        ca_file=ca.cert_file,
        tls_name=TLS_NAME,
        pids={},
        domain=domain,
        seed=seed,
        messages_per_user=messages_per_user,
        bare_logins=bare_logins,
        ns_prefix=prefix,
        ns_sep=sep,
        logs={DOVECOT: logs / "legacy-dovecot.log", POSTFIX: logs / "legacy-postfix.log"},
        message_size_limit=MESSAGE_SIZE_LIMIT,
        **ports,
    )
    state = proc.load_state(lab_dir)
    state[STATE_KEY] = srv.to_json()
    proc.save_state(lab_dir, state)
    try:
        for name in COMPONENTS:
            srv.pids[name] = _start_component(lab_dir, srv, name)
        _acl_recalc(srv)
    except BaseException:
        stop_legacy(lab_dir)
        raise
    return srv


def _acl_recalc(srv: LegacyServer) -> None:
    """Fill the ACL plugin's shared-mailbox dictionary: what the other-users namespace lists."""
    p = subprocess.run(["doveadm", "-c", str(srv.dir / "dovecot.conf"), "acl", "recalc", "-A"],
                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    if p.returncode != 0:
        raise LabError(f"doveadm acl recalc -A failed: {(p.stderr or p.stdout).strip()[-500:]}")


def _write_shared_folders(ldir: Path, users: list[LegacyUser], owner: tuple[int, int], sep: str) -> Path:
    """Public/Announcements (one message, readable by anyone) and the second user's Archive shared with the
    first; returns the public namespace's Maildir root."""
    public = ldir / "public"
    folder = public / ".Announcements"
    for d in ("cur", "new", "tmp"):
        (folder / d).mkdir(parents=True, mode=0o700)
    (folder / "cur" / "1700000000.P1Q1.legacy.lab.test:2,").write_bytes(
        b"From: office@example.test\r\nTo: all@example.test\r\nSubject: Office closed on Friday\r\n"
        b"Message-ID: <announcement-1@example.test>\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n\r\n"
        b"The office is closed on Friday.\r\n"
    )
    _write(folder / "dovecot-acl", "anyone lr\n")
    if len(users) >= 2:
        first, second = users[0], users[1]
        archive = ldir / "mail" / second.login / "Maildir" / ".Archive"
        if archive.is_dir():
            _write(archive / "dovecot-acl", f"owner lrwstipekxa\nuser={first.login} lr\nuser={ADMIN_USER} lr\n")
    mailgen.chown_tree(public, owner)
    for u in users[:2]:
        mailgen.chown_tree(ldir / "mail" / u.login, owner)
    return public


def _folder_name(prefix: str, sep: str, parts: tuple[str, ...]) -> str:
    return "INBOX" if not parts else prefix + sep.join(parts)


def _gid(group: str) -> int:
    return grp.getgrnam(group).gr_gid


def _write_sieve(home: Path, sieve: mailgen.SieveSet) -> None:
    sdir = home / "sieve"
    sdir.mkdir(mode=0o700)
    for name, text in sieve.scripts.items():
        (sdir / f"{name}.sieve").write_text(text)
    # Pigeonhole's file storage: the active script is a symlink into the script directory
    (home / ".dovecot.sieve").symlink_to(f"sieve/{sieve.active}.sieve")


def _start_component(lab_dir: Path, srv: LegacyServer, name: str) -> int:
    log = srv.logs[name]
    if name == DOVECOT:
        conf = srv.dir / "dovecot.conf"
        pid = proc.spawn(["dovecot", "-F", "-c", str(conf)], log)
        proc.record_pid(lab_dir, name, pid)
        for port in (p for p in (srv.imap, srv.imaps, srv.pop3, srv.pop3s, srv.sieve, srv.lmtp) if p):
            proc.wait_service(srv.host, port, pid, what="legacy Dovecot", log=log)
        proc.wait_for(lambda: (srv.dir / "run" / "auth-postfix").exists(), 10, what="Dovecot auth socket")
    elif name == POSTFIX:
        pidfile = srv.dir / "postfix-queue" / "pid" / "master.pid"
        pid = proc.start_postfix(srv.dir / "postfix", pidfile, output=log, log=log)
        proc.record_pid(lab_dir, name, pid)
        for port in (p for p in (srv.smtp, srv.submission, srv.smtps) if p):
            proc.wait_service(srv.host, port, pid, what="legacy Postfix", log=log)
    else:
        raise ValueError(f"unknown legacy component {name!r} (choose from {', '.join(COMPONENTS)})")
    srv.pids[name] = pid
    state = proc.load_state(lab_dir)
    if STATE_KEY in state:
        state[STATE_KEY]["pids"] = dict(srv.pids)
        proc.save_state(lab_dir, state)
    return pid





def stop_legacy(lab_dir: Path) -> None:
    """Stop the legacy Dovecot and Postfix by their recorded pids, with every process they started."""
    lab_dir = lab_dir.resolve()
    pids = proc.load_state(lab_dir).get("pids", {})
    for name in COMPONENTS:
        pid = pids.get(name)
        if pid:
            proc.stop_group(int(pid))
        if name in pids:
            proc.record_pid(lab_dir, name, None)


def restart_legacy_component(lab_dir: Path, name: str) -> int:
    """Stop and start one component ("legacy-dovecot" or "legacy-postfix") with its config; the new pid."""
    if name not in COMPONENTS:
        raise ValueError(f"unknown legacy component {name!r} (choose from {', '.join(COMPONENTS)})")
    lab_dir = lab_dir.resolve()
    srv = load_legacy(lab_dir)
    if srv is None:
        raise LabError(f"no legacy server recorded in {lab_dir}")
    pid = proc.load_state(lab_dir).get("pids", {}).get(name)
    if pid:
        proc.stop_group(int(pid))
    return _start_component(lab_dir, srv, name)
