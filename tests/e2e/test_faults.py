"""Faults: TLS toward the legacy server, the store going away, a slow legacy server, a full disk during a copy.

The sidecar runs as the packaged daemon (`autoport serve`, a subprocess) wherever the fault is about the
daemon's behaviour: exit codes of the real shim, socketmap answers, open descriptors and threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.cli import AUTOPORT
from harness.fake_legacy import FakeLegacy
from harness.labs import make_lab_dir
from harness.shim import run_shim
from harness.waiting import wait_for

from sidecar.config import LegacyConfig
from sidecar.legacy.imap import LegacySource
from sidecar.legacy.verify import LegacyUnavailable, LegacyVerifier, tls_context
from sidecar.migration.copier import SourceParams, SourceUnavailable
from sidecar.wire import authproto, netstring
from sidecar.wire.authproto import Request

ROOT = Path(__file__).resolve().parents[2]
need_root_dovecot = pytest.mark.skipif(
    shutil.which("dovecot") is None or os.geteuid() != 0, reason="needs dovecot and root"
)


# --- TLS toward the legacy server ------------------------------------------------------------------------------


def test_verification_is_on_by_default_for_the_verifier_and_the_copier() -> None:
    cfg = LegacyConfig()
    assert cfg.tls_verify and "none" not in (cfg.imap_tls, cfg.pop3_tls, cfg.submission_tls)
    for ctx in (tls_context(cfg), SourceParams.from_config(cfg, "u", "p").ssl_context):
        assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


@pytest.mark.parametrize("advertised", [False, True], ids=["not-offered", "offered-then-refused"])
def test_starttls_trouble_never_falls_back_to_plaintext(advertised: bool) -> None:
    fake = FakeLegacy(starttls=advertised, accept="right-pw")
    try:
        cfg = fake.config(imap_tls="starttls", pop3_tls="starttls", submission_tls="starttls")
        for proto in ("imap", "pop3", "smtp"):
            with pytest.raises(LegacyUnavailable):
                getattr(LegacyVerifier(cfg), f"verify_{proto}")("alice", "right-pw")
        with pytest.raises(SourceUnavailable), LegacySource(SourceParams.from_config(cfg, "alice", "right-pw")):
            pass
        sent = [c.raw for cmds in fake.commands.values() for c in cmds]
        assert not any(b"right-pw" in raw or b"LOGIN" in raw.upper() or raw.upper().startswith((b"USER", b"AUTH"))
                       for raw in sent), sent  # fmt: skip
    finally:
        fake.close()


@pytest.fixture(scope="module")
def lab_legacy() -> Iterator[Any]:
    from sidecar.lab.legacy import start_legacy, stop_legacy

    d = make_lab_dir("ap-tls-")
    srv = start_legacy(d, host="127.0.0.26", users=1, messages_per_user=0)
    try:
        yield srv
    finally:
        stop_legacy(d)
        shutil.rmtree(d, ignore_errors=True)


def _lab_cfg(srv: Any, **kw: Any) -> LegacyConfig:
    base: dict[str, Any] = {
        "host": srv.host, "imap_port": srv.imap, "imap_tls": "starttls", "pop3_port": srv.pop3, "pop3_tls": "starttls",
        "submission_port": srv.submission, "submission_tls": "starttls", "tls_server_name": srv.tls_name,
        "ca_file": str(srv.ca_file), "timeout": 5.0,
    }  # fmt: skip
    base.update(kw)
    return LegacyConfig(**base)


@need_root_dovecot
@pytest.mark.e2e
@pytest.mark.parametrize("wrong", [{"tls_server_name": "wrong.example"}, {"ca_file": ""}], ids=["name", "ca"])
def test_wrong_certificate_is_temporary_with_a_clear_log_line(
    lab_legacy: Any, wrong: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    user = lab_legacy.users[0]
    good = _lab_cfg(lab_legacy)
    assert LegacyVerifier(good).verify(user.login, user.password) == "imap"  # the lab itself is fine
    bad = _lab_cfg(lab_legacy, **wrong)
    caplog.set_level(logging.INFO, logger="sidecar")
    with pytest.raises(LegacyUnavailable, match=r"(?i)certificate"):
        LegacyVerifier(bad).verify(user.login, user.password)
    lines = [r.getMessage() for r in caplog.records if r.name == "sidecar.legacy.verify"]
    assert len(lines) == 3 and all("CERTIFICATE_VERIFY_FAILED" in line for line in lines), lines
    assert not any(user.password in r.getMessage() for r in caplog.records)
    # the copier's source: same verification, a temporary error naming the cause, no session
    with pytest.raises(SourceUnavailable, match=r"(?i)certificate"):
        LegacySource(SourceParams.from_config(bad, user.login, user.password)).connect()
    with LegacySource(SourceParams.from_config(good, user.login, user.password)) as src:
        assert src.capabilities


# --- the daemon as a subprocess -----------------------------------------------------------------------------


class Sidecar:
    """`autoport serve` with its own config, sockets and store; legacy = a FakeLegacy (IMAP only)."""

    def __init__(self, root: Path, store_url: str, legacy: FakeLegacy, **limits: Any) -> None:
        self.root = root
        self.auth = str(root / "auth.sock")
        self.socketmap = str(root / "sm.sock")
        limit_lines = "".join(f"{k} = {v!r}\n" for k, v in limits.items())
        self.config = root / "autoport.toml"
        self.config.write_text(
            f'[legacy]\nhost = "127.0.0.1"\nimap_port = {legacy.port("imap")}\nimap_tls = "none"\n'
            f'pop3_port = 0\nsubmission_port = 0\nverify_with = ["imap"]\ntimeout = 1.0\nsend_client_ip = false\n'
            f'[mail]\ndomains = ["example.org"]\n[store]\nurl = "{store_url}"\n'
            f'[sockets]\nauth = "{self.auth}"\nsocketmap = "unix:{self.socketmap}"\nmilter = ""\n'
            f'[hash]\nscheme = "SHA512-CRYPT"\n[limits]\ncopy_concurrency = 0\n{limit_lines}'
            f'[log]\ndestination = "file:{root}/sidecar.log"\nlevel = "info"\n'
        )
        subprocess.run([AUTOPORT, "--config", str(self.config), "store", "init"], check=True, capture_output=True,
                       timeout=60)  # fmt: skip
        with open(root / "stderr", "wb") as err:
            self.proc = subprocess.Popen([AUTOPORT, "--config", str(self.config), "serve"], cwd=ROOT,
                                         stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        deadline = time.monotonic() + 20
        # ready, not only listening: the start-up after the sockets (forking the socketmap workers, the node's
        # first heartbeat) must not meet a fault a test injects right after
        while not (os.path.exists(self.auth) and os.path.exists(self.socketmap) and "sidecar ready" in self.log()):
            assert self.proc.poll() is None, (root / "stderr").read_text()
            assert time.monotonic() < deadline, "sidecar did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def lookup(self, key: str) -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(self.socketmap)
            s.sendall(netstring.encode(f"transport {key}".encode()))
            dec = netstring.Decoder()
            while True:
                data = s.recv(4096)
                assert data, "socketmap closed the connection"
                got = dec.feed(data)
                if got:
                    return got[0]

    def login(self, user: str, password: str, tmp: Path) -> int:
        return run_shim(self.auth, f"{user}\0{password}\0\0".encode(), tmp)[0]

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def sockets(self) -> int:
        """Open sockets of the daemon (listeners, clients, legacy connections)."""
        n = 0
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/{self.proc.pid}/fd/{fd}").startswith("socket:")
        return n

    def threads(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        raise AssertionError("no Threads line")

    def log(self) -> str:
        path = self.root / "sidecar.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def sidecar_dir() -> Iterator[Path]:
    d = make_lab_dir("ap-flt-")  # PostgreSQL runs as its own user
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.postgres
def test_store_down_is_temporary_everywhere_and_the_sidecar_recovers(sidecar_dir: Path, tmp_path: Path) -> None:
    from sidecar.lab.pgcluster import PgCluster

    fake = FakeLegacy(accept="right-pw")
    with PgCluster(sidecar_dir / "pg") as pg:
        sc = Sidecar(sidecar_dir, pg.url(), fake)
        try:
            assert sc.login("ann@example.org", "right-pw", tmp_path) == 0
            assert sc.lookup("ann@example.org").startswith(b"OK ")  # copying: relayed to legacy
            pg.stop()
            assert sc.login("bob@example.org", "right-pw", tmp_path) == 111  # [UNAVAILABLE]
            assert sc.login("ann@example.org", "right-pw", tmp_path) in (0, 111)  # cached yes, or TEMP
            assert sc.lookup("ann@example.org").startswith((b"TEMP ", b"TIMEOUT "))
            assert sc.proc.poll() is None
            pg.start()
            wait_for(lambda: not sc.lookup("ann@example.org").startswith((b"TEMP", b"TIMEOUT")), 30,
                     "the socketmap to recover by itself", interval=0.5)  # fmt: skip
            assert sc.login("bob@example.org", "right-pw", tmp_path) == 0
        finally:
            sc.stop()
            fake.close()
    assert "store" in sc.log() and "right-pw" not in sc.log()


@pytest.mark.e2e
def test_sqlite_store_locked_is_temporary_and_recovers(sidecar_dir: Path, tmp_path: Path) -> None:
    fake = FakeLegacy(accept="right-pw")
    db = sidecar_dir / "store" / "state.db"
    sc = Sidecar(sidecar_dir, f"sqlite:///{db}", fake)
    locker = sqlite3.connect(db, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # a writer that never finishes (another process, a stuck admin)
        started = time.monotonic()
        assert sc.login("cy@example.org", "right-pw", tmp_path) == 111  # after the store's busy timeout
        assert time.monotonic() - started < 25
        # WAL readers are not blocked by a writer: routing keeps answering from the last committed state
        assert sc.lookup("cy@example.org").startswith((b"OK ", b"NOTFOUND"))
        locker.execute("ROLLBACK")
        assert sc.login("cy@example.org", "right-pw", tmp_path) == 0
    finally:
        locker.close()
        sc.stop()
        fake.close()
    assert "store-unavailable" in sc.log()


def _children(pid: int, cmdline: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == pid and (entry / "cmdline").read_bytes() == cmdline:
                    found.append(int(entry.name))
    return sorted(found)


def _socketmap_supervisor(pid: int) -> int:
    """The daemon's socketmap supervisor: its one forked child running the daemon's own command line."""
    (supervisor,) = _children(pid, Path(f"/proc/{pid}/cmdline").read_bytes())
    return supervisor


def _socketmap_workers(pid: int) -> list[int]:
    """The socketmap workers: the supervisor's children (never the daemon's: they are not copies of it)."""
    with contextlib.suppress(ValueError, OSError):
        return _children(_socketmap_supervisor(pid), Path(f"/proc/{pid}/cmdline").read_bytes())
    return []


@pytest.mark.e2e
def test_killed_socketmap_worker_is_restarted_and_postfix_keeps_getting_answers(
    sidecar_dir: Path, tmp_path: Path
) -> None:
    fake = FakeLegacy(accept="right-pw")
    sc = Sidecar(sidecar_dir, f"sqlite:///{sidecar_dir / 'store' / 'state.db'}", fake)
    pf = tmp_path / "pf"
    pf.mkdir()
    (pf / "main.cf").write_text("")
    os.utime(pf / "main.cf", (time.time() - 60, time.time() - 60))  # Postfix re-reads a main.cf of this second
    answers: list[tuple[int, str, str]] = []
    stop = threading.Event()

    def postfix_asks() -> None:  # Postfix's own client, a new connection each time, all through the restart
        while not stop.is_set():
            out = subprocess.run(["postmap", "-c", str(pf), "-q", "ann@example.org",
                                  f"socketmap:unix:{sc.socketmap}:transport"],
                                 capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
            answers.append((out.returncode, out.stdout.strip(), out.stderr))

    try:
        assert sc.login("ann@example.org", "right-pw", tmp_path) == 0  # copying: relayed to the legacy server
        route = sc.lookup("ann@example.org").decode()[3:]
        assert route.startswith("legacy:[127.0.0.1]")
        workers = _socketmap_workers(sc.proc.pid)
        assert len(workers) == 2, workers  # [sockets] socketmap_workers defaults to 2
        asker = threading.Thread(target=postfix_asks)
        asker.start()
        time.sleep(0.3)
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: len(now := _socketmap_workers(sc.proc.pid)) == 2 and workers[0] not in now, 10,
                 "the killed worker to be forked again")  # fmt: skip
        time.sleep(0.3)
        stop.set()
        asker.join(30)
        assert workers[1] in _socketmap_workers(sc.proc.pid)  # the other one kept serving
        # every answer Postfix got is the right route; a lookup caught by the kill is a temporary error
        wrong = [a for a in answers if (a[0] == 0 and a[1] != route) or (a[0] != 0 and "temporary" not in a[2])]
        assert wrong == [] and sum(a[0] == 0 for a in answers) >= 3, answers[:5]
        assert sc.lookup("ann@example.org").decode()[3:] == route
        assert sc.proc.poll() is None
        # the supervisor killed: the daemon forks a new one, the old workers go with it, two new ones answer
        supervisor = _socketmap_supervisor(sc.proc.pid)
        old = _socketmap_workers(sc.proc.pid)
        os.kill(supervisor, signal.SIGKILL)
        wait_for(lambda: len(now := _socketmap_workers(sc.proc.pid)) == 2 and not set(now) & set(old), 10,
                 "a new supervisor with new workers")  # fmt: skip
        assert _socketmap_supervisor(sc.proc.pid) != supervisor
        wait_for(lambda: sc.lookup("ann@example.org").decode()[3:] == route, 10, "the right route again")
        assert "socketmap supervisor" in sc.log() and sc.proc.poll() is None
        workers = _socketmap_workers(sc.proc.pid)
    finally:
        stop.set()
        sc.stop()
        fake.close()
    assert "socketmap worker 0" in sc.log() and "starting it again" in sc.log()
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # stopped with the daemon


@pytest.mark.e2e
def test_socketmap_workers_end_with_a_killed_daemon(sidecar_dir: Path) -> None:
    fake = FakeLegacy(accept="right-pw")
    sc = Sidecar(sidecar_dir, f"sqlite:///{sidecar_dir / 'store' / 'state.db'}", fake)
    try:
        workers = _socketmap_workers(sc.proc.pid)
        assert len(workers) == 2
        sc.proc.kill()  # SIGKILL: the daemon cannot stop them itself
        sc.proc.wait(10)
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 10,
                 "the orphaned workers to end")  # fmt: skip
    finally:
        sc.stop()
        fake.close()


@pytest.mark.e2e
def test_slow_legacy_server_bounded_waits_and_no_pile_up(sidecar_dir: Path) -> None:
    fake = FakeLegacy(delay=30)  # accepts the connection, then says nothing for 30 s
    sc = Sidecar(sidecar_dir, f"sqlite:///{sidecar_dir / 'store' / 'state.db'}", fake, auth_concurrency=4)
    try:
        time.sleep(0.5)
        fds_before, threads_before, sockets_before = sc.fds(), sc.threads(), sc.sockets()
        results: list[tuple[str, float]] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            t0 = time.monotonic()
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(30)
                s.connect(sc.auth)
                s.sendall(authproto.encode_request(Request(f"u{i}@example.org", "pw-1234", "imap", "198.51.100.9")))
                reply = authproto.decode_reply(s.recv(4096))
            with lock:
                results.append((reply.status, time.monotonic() - t0))

        peak_fds, peak_threads = 0, 0
        workers = [threading.Thread(target=one, args=(i,)) for i in range(60)]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            peak_fds, peak_threads = max(peak_fds, sc.fds()), max(peak_threads, sc.threads())
            time.sleep(0.05)
        assert len(results) == 60 and {status for status, _ in results} == {"TEMP"}
        # legacy.timeout = 1 s bounds each check, 4 at a time; the others wait at most busy_wait (2 s) for a
        # slot, then TEMP. They queue for the 12 decision threads (auth_concurrency * 2 + 4), so the slowest
        # answer comes after about 60 / 12 rounds of 2 s: bounded, far below decide_timeout (60 s)
        assert max(took for _, took in results) < (60 / 12 + 2) * 2.0, sorted(took for _, took in results)[-5:]
        assert peak_threads - threads_before <= 4 * 2 + 4 + 2, (threads_before, peak_threads)
        # client sockets, 4 legacy sockets, and each decision thread's own SQLite connection (file + WAL)
        assert peak_fds - fds_before <= 60 + 4 + 12 * 3, (fds_before, peak_fds)
        with contextlib.suppress(AssertionError):  # closing takes a moment; the asserts below say what stayed
            wait_for(lambda: sc.sockets() == sockets_before and sc.fds() <= fds_before + 12 * 3, 1.0)
        assert sc.sockets() == sockets_before, (sockets_before, sc.sockets())  # nothing left open
        assert sc.fds() <= fds_before + 12 * 3, (fds_before, sc.fds())  # only the per-thread store connections
        assert fake.connections["imap"] <= 60
        assert sc.proc.poll() is None
    finally:
        sc.stop()
        fake.close()


# --- disk full during a copy ------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                       capture_output=True, text=True, check=False)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@need_root_dovecot
@pytest.mark.e2e
def test_disk_full_during_a_copy_fails_cleanly_and_is_retried(tmp_path: Path) -> None:
    from harness import copier_lab as lab

    from sidecar import config
    from sidecar.auth.policy import CredentialCache
    from sidecar.migration.copier.maildir import UIDLIST
    from sidecar.migration.jobs import Hooks, JobRunner
    from sidecar.states import State
    from sidecar.store import open_store

    address = "dora@example.org"
    root = lab.lab_dir()
    legacy = lab.start_legacy(root / "legacy", address, host=lab.private_host())
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        lab.populate(legacy, address, "dovecot", big=400_000)  # message 2 is ~400 KB, the rest small
        store.init()
        with small_tmpfs(root / "vmail", "256k") as mail_root:
            cfg = config.from_dict({
                "legacy": {"host": legacy.host, "imap_port": legacy.imap, "imap_tls": "none", "pop3_port": legacy.pop3,
                           "pop3_tls": "none", "timeout": 10.0},
                "target": {"mail_root": str(mail_root)},
                "limits": {"cutover_grace": 0.0, "copy_attempts": 5},
            })  # fmt: skip
            creds = CredentialCache()
            creds.put(address, address, lab.PASSWORD)
            hooks = Hooks(release_held=lambda a: 0, after_migrated=lambda a, logins: None)
            # the runner's clock is an hour behind: a retry scheduled "in 30 s" can be leased at once
            runner = JobRunner(cfg, store, creds, owner="t", hooks=hooks, clock=lambda: time.time() - 3600)
            store.transition(address, State.COPYING, reason="first login")
            store.enqueue(address, "copy")

            job = store.lease("t", seconds=60)
            assert job is not None
            runner.run_job(job)  # ENOSPC on the big message
            account = store.get(address)
            assert account is not None and account.state is State.COPYING  # still on legacy, not failed
            assert "No space left" in account.last_error, account.last_error
            assert runner.stats["retried"] == 1
            inbox = mail_root / "example.org" / "dora" / "Maildir"
            _assert_only_complete_messages(inbox)

            subprocess.run(["mount", "-o", "remount,size=64m", str(mail_root)], check=True)
            job = store.lease("t", seconds=60)
            assert job is not None, "the failed job is not scheduled again"
            runner.run_job(job)
            account = store.get(address)
            assert account is not None and account.state is State.MIGRATED, account
            _assert_only_complete_messages(inbox)
            uids = [int(line.split()[0]) for line in (inbox / UIDLIST).read_text().splitlines()[1:]]
            assert len(uids) == len(set(uids)) == 10  # 12 appended, 2 expunged: each exactly once
    finally:
        store.close()
        lab.cleanup(legacy)
        shutil.rmtree(root, ignore_errors=True)


def _assert_only_complete_messages(folder: Path) -> None:
    """Every file in cur/ is named by the uidlist and has the size its name says; tmp/ holds nothing."""
    from sidecar.migration.copier.maildir import UIDLIST

    names = {p.name.split(":2,")[0]: p for p in (folder / "cur").iterdir()} if (folder / "cur").exists() else {}
    listed = set()
    if (folder / UIDLIST).exists():
        listed = {line.split(" :", 1)[1] for line in (folder / UIDLIST).read_text().splitlines()[1:]}
    assert set(names) <= listed, set(names) - listed
    for base, path in names.items():
        size = int(base.split(",S=")[1].split(",")[0])
        assert path.stat().st_size == size, path
    if (folder / "tmp").exists():
        assert list((folder / "tmp").iterdir()) == []
