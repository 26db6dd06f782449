"""The target writer: a Dovecot Maildir++ mailbox written directly, keeping UIDVALIDITY, UIDs and POP3 UIDLs.

Formats (checked against Dovecot 2.3.19 on Debian 12 and its source, maildir-uidlist.c):
- `dovecot-uidlist`: header `3 V<uidvalidity> N<nextuid>[ G<guid> ...]`, then one line per message
  `<uid>[ P<pop3-uidl>][ O<pop3-order>] :<basename>`, ascending UIDs; basename = file name before ":2,".
- files `cur/<basename>:2,<flags>` with basename `<time>.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<vsize>`
  (S = bytes on disk, W = size with CRLF line endings); flag letters D F R S T, then keyword letters a..z.
- `dovecot-keywords`: `<index> <keyword>` lines, index 0..25 = letter a..z.
- mtime of a message file = INTERNALDATE.
- `subscriptions` (Maildir root): "V\\t2\\n\\n" then names, levels in modified UTF-7 separated by TAB.

More (the reasons and limits behind this module): docs/modules.md, sidecar/migration/copier/maildir.py.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import datetime as dt
import functools
import itertools
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from sidecar.migration.copier.folders import (
    LAYOUT,
    SUBSCRIPTIONS_HEADER,
    TargetLayout,
    from_disk,
    subscription_line,
    to_disk,
)
from sidecar.wire.fetchparse import Body

UIDLIST = "dovecot-uidlist"
KEYWORDS = "dovecot-keywords"
SUBSCRIPTIONS = "subscriptions"
MAX_KEYWORDS = 26

SYSTEM_FLAGS = {"\\draft": "D", "\\flagged": "F", "\\answered": "R", "\\seen": "S", "\\deleted": "T"}
LETTER_FLAGS = {v: k for k, v in SYSTEM_FLAGS.items()}
IMAP_FLAG_NAMES = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}

Owner = tuple[int, int] | None


class MaildirError(Exception):
    """The target mailbox is not in a state we can write (corrupt uidlist, UID order broken)."""


class MaildirLocked(MaildirError):
    """Dovecot (or another writer) held the folder's uidlist lock for longer than we wait: temporary."""


LOCK = "dovecot-uidlist.lock"
KEYWORDS_LOCK = "dovecot-keywords.lock"
LOCK_STALE = 120.0  # seconds: a lock this old whose holder we cannot check is overridden (Dovecot: 2 min)
_TAG_RE = re.compile(r"\.M\d+P\d+Q\d+L(\d+)x(\d+)\.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DotLock:
    """Dovecot's dot-lock: `<name>.lock` created with O_EXCL, content `pid:hostname`.

    A lock naming a dead pid on this host is overridden at once; one older than LOCK_STALE (a holder on
    another host, or a hung one) too. Waits up to `timeout` seconds, then raises MaildirLocked.
    """

    def __init__(self, path: Path, owner: Owner, timeout: float = 30.0) -> None:
        self.path = path
        self.owner = owner
        self.timeout = timeout
        self.held = False

    def __enter__(self) -> DotLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        me = f"{os.getpid()}:{socket.gethostname()}"
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                if self._stale():
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                if time.monotonic() > deadline:
                    raise MaildirLocked(f"{self.path} held for more than {self.timeout:.0f}s") from None
                time.sleep(0.02)
                continue
            try:
                _chown(fd, self.owner)  # Dovecot (the mail user) must be able to read it
                os.fchmod(fd, 0o644)
                os.write(fd, me.encode())
            finally:
                os.close(fd)
            self.held = True
            return

    def _stale(self) -> bool:
        try:
            content = self.path.read_text("ascii", "replace").strip()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False  # gone meanwhile: try again
        pid, _, host = content.partition(":")
        if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
            return True
        return age > LOCK_STALE

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False


def legacy_tag(uidvalidity: int, uid: int) -> str:
    return f"L{uidvalidity}x{uid}"


def parse_legacy_tag(name: str) -> tuple[int, int] | None:
    """(legacy UIDVALIDITY, legacy UID) carried in a base name written by stage_append(), or None."""
    m = _TAG_RE.search(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


@functools.cache
def _host() -> str:
    """This host's name as Dovecot puts it in a Maildir file name (computed once per process)."""
    return (
        socket.gethostname().replace("/", "\\057").replace(":", "\\072").replace(",", "\\054") or "localhost"
    )


_seq = itertools.count(1)


def new_basename(size: int, vsize: int, tag: str = "") -> str:
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_seq)}{tag}.{_host()},S={size},W={vsize}"


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
SYNC_THREADS = 8  # concurrent fsyncs: ext4/xfs commit them together (one journal commit for many files)


def _sync_pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="maildir-fsync")
        return _POOL


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs(2), or None: not Linux, no such symbol, or a kernel before 5.8 (whose syncfs does not
    report writeback errors, so a failed write would go unnoticed: fsync every file there instead)."""
    if not sys.platform.startswith("linux"):
        return None
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if m is None or (int(m.group(1)), int(m.group(2))) < (5, 8):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs  # CDLL releases the GIL during the call
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()
USE_SYNCFS = _SYNCFS is not None  # tests switch it off to exercise the fsync-per-file path


def _syncfs(fd: int) -> None:
    """Write out and wait for everything dirty on fd's filesystem; raises the writeback errors seen since fd
    was opened (or since the last syncfs on it)."""
    assert _SYNCFS is not None
    if _SYNCFS(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


def _write_new(path: str, body: Body, owner: Owner, mtime: float | None) -> int:
    """Create `path` with the body (no copy of it), owner, mode 0600 and mtime; returns the open descriptor.
    A failed write leaves no partial file (ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _chown(fd, owner)
        with body.view() as whole:
            done = 0
            while done < len(whole):
                done += os.write(fd, whole[done:])
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chown(path: Path | int, owner: Owner) -> None:
    if owner is None:
        return
    if isinstance(path, int):
        os.fchown(path, *owner)
    else:
        os.chown(path, *owner)


def _mkdir(path: Path, owner: Owner) -> None:
    if path.is_dir():
        return
    path.mkdir(mode=0o700)
    _chown(path, owner)


def write_file_atomic(path: Path, data: bytes, owner: Owner, mode: int = 0o600) -> None:
    """Write, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.autoport-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        _chown(fd, owner)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):  # a full disk must not keep a half-written file
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclasses.dataclass
class Record:
    uid: int
    base: str  # file name before ":2,"
    filename: str  # current name in its directory
    subdir: str  # "cur" or "new"
    letters: str  # maildir info letters after ":2," (system flags and keyword letters)
    pop3_uidl: str | None = None
    ext: tuple[str, ...] = ()  # other uidlist extension fields, kept as they are
    pop3_order: int | None = None  # O field: position in POP3 listings (when it differs from UID order)


@dataclasses.dataclass
class _Staged:
    uid: int
    tmp: str  # path in tmp/ (a str: no Path object per message)
    base: str
    letters: str
    pop3_uidl: str | None
    flags: tuple[str, ...] = ()  # append mode: letters are chosen under the lock
    synced: Future[None] | None = None  # the background fsync (and close) of the tmp file; None: syncfs covers it


@dataclasses.dataclass
class _Commit:
    """One batch's commit: what it makes visible, and (background) the thread doing it and how that ended."""

    staged: list[_Staged]
    records: list[Record]  # the batch's records, ascending UIDs: added to MaildirFolder.records once durable
    next_uid: int
    thread: threading.Thread | None = None
    error: BaseException | None = None


def flags_to_letters(flags: Iterable[str], keyword_letter: dict[str, str]) -> str:
    """Maildir info letters for IMAP flags (\\Recent and unknown system flags dropped)."""
    out = set()
    for f in flags:
        if f.startswith("\\"):
            letter = SYSTEM_FLAGS.get(f.lower())
            if letter:
                out.add(letter)
        elif f in keyword_letter:
            out.add(keyword_letter[f])
    return "".join(sorted(out))


class MaildirFolder:
    """One Maildir++ folder (INBOX is the Maildir root itself). Use open() before anything else."""

    def __init__(self, path: Path, *, owner: Owner = None, is_inbox: bool = False) -> None:
        self.path = path
        self.owner = owner
        self.is_inbox = is_inbox
        self.uidvalidity = 0
        self.next_uid = 1
        self.header_ext: list[str] = []
        self.records: dict[int, Record] = {}
        self.keywords: dict[str, int] = {}  # keyword -> index 0..25
        self.lost_keywords: collections.Counter[str] = collections.Counter()
        self.orphans_removed = 0
        self._staged: list[_Staged] = []
        self._sync_fd: int | None = None  # the folder, opened before the batch's first write: syncfs at commit
        self._inflight: _Commit | None = None  # a batch being committed in the background
        self._failed: list[_Staged] = []  # a batch whose commit failed: abort() removes its files from tmp/
        self._dirty = False
        self._keywords_dirty = False
        self._cur_dirty = False

    # --- opening -----------------------------------------------------------------------------------------
    @property
    def tmp_dir(self) -> Path:
        return self.path / "tmp"

    def exists(self) -> bool:
        return (self.path / "cur").is_dir()

    def open(self) -> MaildirFolder:
        """Create the folder if needed, read uidlist and keywords, drop leftovers of an interrupted pass."""
        _mkdir(self.path, self.owner)
        for sub in ("cur", "new", "tmp"):
            _mkdir(self.path / sub, self.owner)
        if not self.is_inbox and not (self.path / "maildirfolder").exists():
            fd = os.open(self.path / "maildirfolder", os.O_WRONLY | os.O_CREAT, 0o600)
            _chown(fd, self.owner)
            os.close(fd)
        self._read_keywords()
        self._read_uidlist()
        self._scan_files()
        for leftover in self.tmp_dir.iterdir():
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                leftover.unlink()
        return self

    def _read_keywords(self) -> None:
        self.keywords = {}
        p = self.path / KEYWORDS
        if not p.exists():
            return
        for line in p.read_text("utf-8", "surrogateescape").splitlines():
            idx, _, name = line.partition(" ")
            if idx.isdigit() and name and int(idx) < MAX_KEYWORDS:
                self.keywords[name] = int(idx)

    def _read_uidlist(self) -> None:
        self.records = {}
        self.header_ext = []
        self.uidvalidity, self.next_uid = 0, 1
        p = self.path / UIDLIST
        if not p.exists():
            return
        lines = p.read_text("utf-8", "surrogateescape").splitlines()
        if not lines:
            return
        head = lines[0].split(" ")
        if head[0] != "3":
            raise MaildirError(f"{p}: unsupported uidlist version {head[0]!r}")
        for field in head[1:]:
            if field.startswith("V") and field[1:].isdigit():
                self.uidvalidity = int(field[1:])
            elif field.startswith("N") and field[1:].isdigit():
                self.next_uid = int(field[1:])
            elif field:
                self.header_ext.append(field)
        prev = 0
        for n, line in enumerate(lines[1:], start=2):
            if not line:
                continue
            left, sep, name = line.partition(":")
            fields = left.split()
            if not sep or not fields or not fields[0].isdigit() or not name:
                raise MaildirError(f"{p} line {n}: malformed")
            uid = int(fields[0])
            if uid <= prev:
                raise MaildirError(f"{p} line {n}: UIDs not ascending")
            prev = uid
            pop3 = None
            order = None
            ext = []
            for f in fields[1:]:
                if f.startswith("P"):
                    pop3 = f[1:]
                elif f.startswith("O") and f[1:].isdigit():
                    order = int(f[1:])
                else:
                    ext.append(f)
            self.records[uid] = Record(uid, name, name, "", "", pop3, tuple(ext), order)
        self.next_uid = max(self.next_uid, prev + 1)

    def _scan_files(self, shared: bool = False) -> None:
        """Find each record's file. Exclusive: remove files the uidlist does not name and forget records
        without a file. Shared (Dovecot owns the folder): only look, change nothing."""
        by_base = {r.base: r for r in self.records.values()}
        for sub in ("cur", "new"):
            for name in os.listdir(self.path / sub):
                base, _, info = name.partition(":")
                rec = by_base.get(base)
                if rec is None and shared:
                    continue  # Dovecot's, waiting for a UID
                if rec is None:
                    # written by an interrupted pass after its uidlist: not visible to anyone yet
                    with contextlib.suppress(FileNotFoundError):
                        (self.path / sub / name).unlink()
                    self.orphans_removed += 1
                    self._cur_dirty = True
                    continue
                rec.filename, rec.subdir = name, sub
                rec.letters = info[2:] if info.startswith("2,") else ""
        if shared:
            return
        missing = [uid for uid, r in self.records.items() if not r.subdir]
        for uid in missing:  # file gone (expunged by a pass interrupted before its uidlist rewrite)
            del self.records[uid]
            self._dirty = True

    # --- queries -----------------------------------------------------------------------------------------
    @property
    def last_uid(self) -> int:
        return max(self.records, default=0)

    def file_path(self, uid: int) -> Path:
        r = self.records[uid]
        return self.path / r.subdir / r.filename

    def flags(self, uid: int) -> frozenset[str]:
        """IMAP flags and keywords of a message as stored."""
        by_letter = {chr(ord("a") + i): k for k, i in self.keywords.items()}
        out = set()
        for c in self.records[uid].letters:
            if c in IMAP_FLAG_NAMES:
                out.add(IMAP_FLAG_NAMES[c])
            elif c in by_letter:
                out.add(by_letter[c])
        return frozenset(out)

    def file_vsize(self, uid: int) -> int:
        """A message's size with CRLF line ends (the W= of its name, else counted)."""
        m = re.search(r",W=(\d+)", self.records[uid].base)
        if m:
            return int(m.group(1))
        data = self.file_path(uid).read_bytes()
        return len(data) + data.count(b"\n") - data.count(b"\r\n")

    def read_header(self, uid: int, limit: int = 1 << 18) -> bytes:
        """The header block of a message (up to and including the empty line), at most `limit` bytes."""
        with open(self.file_path(uid), "rb") as f:
            data = f.read(limit)
        for sep in (b"\r\n\r\n", b"\n\n"):
            i = data.find(sep)
            if i >= 0:
                return data[: i + len(sep)]
        return data

    # --- changes -----------------------------------------------------------------------------------------
    def reset(self, uidvalidity: int, next_uid: int = 1) -> None:
        """Empty the folder (new legacy UIDVALIDITY): messages, uidlist, keywords, Dovecot indexes."""
        self.flush()
        self._close_sync_fd()
        with contextlib.suppress(OSError):
            self._wait_synced()  # no background fsync left on a file removed below
        for sub in ("cur", "new", "tmp"):
            for name in os.listdir(self.path / sub):
                with contextlib.suppress(FileNotFoundError):
                    (self.path / sub / name).unlink()
        for name in os.listdir(self.path):
            if name in (UIDLIST, KEYWORDS) or name.startswith("dovecot.index"):
                with contextlib.suppress(FileNotFoundError):
                    (self.path / name).unlink()
        for s in self._staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s.tmp)
        self._staged = []
        self.records = {}
        self.keywords = {}
        self.header_ext = []
        self.lost_keywords.clear()
        self.uidvalidity = uidvalidity
        self.next_uid = next_uid
        self._dirty = self._keywords_dirty = self._cur_dirty = True

    def set_header(self, uidvalidity: int, next_uid: int) -> None:
        if self.uidvalidity != uidvalidity:
            self.uidvalidity = uidvalidity
            self._dirty = True
        if next_uid > self.next_uid:
            self.next_uid = next_uid
            self._dirty = True

    def _letters(self, flags: Iterable[str]) -> str:
        flags = list(flags)
        for f in flags:
            if f.startswith("\\") or f in self.keywords:
                continue
            used = set(self.keywords.values())
            free = next((i for i in range(MAX_KEYWORDS) if i not in used), None)
            if free is None:
                self.lost_keywords[f] += 1
                continue
            self.keywords[f] = free
            self._keywords_dirty = True
        return flags_to_letters(flags, {k: chr(ord("a") + i) for k, i in self.keywords.items()})

    def stage(
        self,
        uid: int,
        body: Body | bytes,
        flags: Iterable[str],
        internaldate: dt.datetime | None,
        pop3_uidl: str | None = None,
    ) -> int:
        """Write one message into tmp/ (a spooled Body is moved); visible after commit(). Returns its size."""
        # the staged UIDs ascend (each was checked here), so the last one is the highest: no scan per message
        if uid <= (self._staged[-1].uid if self._staged else max(self.last_uid, self._inflight_last)):
            raise MaildirError(f"{self.path}: UID {uid} is not above the last UID")
        tmp, base, size, synced = self._write_tmp(body, internaldate)
        self._staged.append(_Staged(uid, tmp, base, self._letters(flags), pop3_uidl, synced=synced))
        return size

    def _write_tmp(
        self, body: Body | bytes, internaldate: dt.datetime | None, tag: str = ""
    ) -> tuple[str, str, int, Future[None] | None]:
        """Write (or move) a message into tmp/, not yet durable: _wait_synced() (commit) makes it so, before
        the first rename. With syncfs: one syncfs of the filesystem per batch, on a descriptor opened before the
        batch's first write (so writeback errors of its files are reported). Without it (and for a body spooled
        before that descriptor existed): the file's own fsync, run by a background pool while the next
        messages arrive (concurrent fsyncs share journal commits); the returned future is that fsync."""
        if USE_SYNCFS and self._sync_fd is None:
            self._sync_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if isinstance(body, bytes):
            b = Body(len(body), len(body) + 1, None)
            b.write(body)
            b.finish()
            body = b
        base = new_basename(body.size, body.vsize, tag)
        tmp = os.path.join(self.path, "tmp", base)
        ts = internaldate.timestamp() if internaldate is not None else None
        if body.path is None:
            fd = _write_new(tmp, body, self.owner, ts)
            if self._sync_fd is not None:
                os.close(fd)
                return tmp, base, body.size, None
            return tmp, base, body.size, _sync_pool().submit(_fsync_close, fd)
        if body.path.parent != self.tmp_dir:
            shutil.move(body.path, tmp)
        else:
            os.rename(body.path, tmp)
        body.path = None
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _chown(fd, self.owner)
            os.fchmod(fd, 0o600)
            if ts is not None:
                os.utime(fd, (ts, ts))
        except BaseException:
            os.close(fd)
            raise
        return tmp, base, body.size, _sync_pool().submit(_fsync_close, fd)

    # --- append mode (Dovecot owns the folder) ---------------------------------------------------------
    def open_shared(self) -> MaildirFolder:
        """Open a folder Dovecot serves: create it when missing, read uidlist and keywords, clean nothing."""
        _mkdir(self.path, self.owner)
        for sub in ("cur", "new", "tmp"):
            _mkdir(self.path / sub, self.owner)
        if not self.is_inbox and not (self.path / "maildirfolder").exists():
            fd = os.open(self.path / "maildirfolder", os.O_WRONLY | os.O_CREAT, 0o600)
            _chown(fd, self.owner)
            os.close(fd)
        self._read_keywords()
        self._read_uidlist()
        self._scan_files(shared=True)
        # our own leftovers only (an interrupted append): tmp/ also holds Dovecot's deliveries in progress
        for leftover in self.tmp_dir.iterdir():
            if parse_legacy_tag(leftover.name) or leftover.name.startswith("autoport-spool."):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
        return self

    def legacy_tags(self, uidvalidity: int) -> set[int]:
        """Legacy UIDs (under uidvalidity) of messages appended by us: in the uidlist, or in cur/ and new/
        without a UID yet (an append interrupted between rename and uidlist; Dovecot gives them one)."""
        out = set()
        names = [r.base for r in self.records.values()]
        for sub in ("cur", "new"):
            with contextlib.suppress(FileNotFoundError):
                names.extend(os.listdir(self.path / sub))
        for name in names:
            tag = parse_legacy_tag(name)
            if tag is not None and tag[0] == uidvalidity:
                out.add(tag[1])
        return out

    def stage_append(
        self,
        body: Body | bytes,
        flags: Iterable[str],
        internaldate: dt.datetime | None,
        legacy: tuple[int, int],
        pop3_uidl: str | None = None,
    ) -> int:
        """Write one legacy message into tmp/ for commit_append(); returns its size."""
        tmp, base, size, synced = self._write_tmp(body, internaldate, legacy_tag(*legacy))
        self._staged.append(_Staged(0, tmp, base, "", pop3_uidl, tuple(flags), synced))
        return size

    def commit_append(self, uidvalidity: int = 0, lock_timeout: float = 30.0) -> list[int]:
        """Give the staged messages new UIDs under Dovecot's uidlist lock; returns the UIDs, in order.

        uidvalidity is used only when the folder has no uidlist yet (a folder new on the target).
        """
        self.flush()
        if not self._staged:
            return []
        self._wait_synced()
        uids: list[int] = []
        with DotLock(self.path / LOCK, self.owner, lock_timeout):
            self._read_uidlist()  # Dovecot may have appended lines (without raising N) since we looked
            if not self.uidvalidity:
                self.uidvalidity = uidvalidity or int(time.time())
                self._dirty = True
            wanted = {f for s in self._staged for f in s.flags if not f.startswith("\\")}
            self._read_keywords()
            if wanted - set(self.keywords):
                with DotLock(self.path / KEYWORDS_LOCK, self.owner, lock_timeout):
                    self._read_keywords()
                    for s in self._staged:
                        s.letters = self._letters(s.flags)
                    if self._keywords_dirty:
                        self._write_keywords()
            for s in self._staged:
                s.letters = self._letters(s.flags)
            uid = max(self.next_uid, self.last_uid + 1)
            cur = f"{self.path}/cur/"
            for s in self._staged:
                name = f"{s.base}:2,{s.letters}"
                os.rename(s.tmp, cur + name)
                self.records[uid] = Record(uid, s.base, name, "cur", s.letters, s.pop3_uidl)
                uids.append(uid)
                uid += 1
            self.next_uid = uid
            _fsync_dir(self.path / "cur")
            self._staged = []
            self._write_uidlist()
            self._dirty = False
        return uids

    def set_flags(self, uid: int, flags: Iterable[str]) -> bool:
        """Give a stored message exactly these flags and keywords; True when something changed."""
        rec = self.records[uid]
        letters = self._letters(flags)
        if letters == rec.letters and rec.subdir == "cur":
            return False
        new_name = f"{rec.base}:2,{letters}"
        os.rename(self.path / rec.subdir / rec.filename, self.path / "cur" / new_name)
        rec.filename, rec.subdir, rec.letters = new_name, "cur", letters
        self._cur_dirty = True
        return True

    def expunge(self, uid: int) -> None:
        rec = self.records.pop(uid)
        with contextlib.suppress(FileNotFoundError):
            (self.path / rec.subdir / rec.filename).unlink()
        self._dirty = self._cur_dirty = True

    def set_pop3_order(self, uid: int, order: int | None) -> None:
        """Dovecot's POP3 order (uidlist `O<n>`, maildir-uidlist.c MAILDIR_UIDLIST_REC_EXT_POP3_ORDER): POP3
        lists messages with an order by it, before those without one (checked on Dovecot 2.3.19)."""
        rec = self.records[uid]
        if rec.pop3_order != order:
            rec.pop3_order = order
            self._dirty = True

    def set_pop3_uidl(self, uid: int, uidl: str) -> None:
        if not uidl or any(c.isspace() for c in uidl) or ":" in uidl[:1]:
            raise MaildirError(f"POP3 UIDL {uidl!r} cannot be stored in dovecot-uidlist")
        rec = self.records[uid]
        if rec.pop3_uidl != uidl:
            rec.pop3_uidl = uidl
            self._dirty = True

    @property
    def pending(self) -> int:
        return len(self._staged)

    @property
    def _inflight_last(self) -> int:
        job = self._inflight
        return job.records[-1].uid if job is not None and job.records else 0

    def commit(self, *, background: bool = False) -> None:
        """Make everything staged and changed durable and visible (see module doc for the order).

        background: the part that waits on the disk (the batch's syncfs or fsyncs, the renames, the fsync of
        cur/, dovecot-keywords and dovecot-uidlist, in that order) runs on a thread of its own while the caller
        stages the next batch; nothing else of the folder's state is shared with that thread. At most one batch
        is in flight: the next commit(), flush() or abort() waits for it first and raises its error. `records`
        (and `last_uid`) take a batch in only once it is durable, so a watermark recorded after commit() or
        flush() returned never names a message still in flight.
        """
        self.flush()
        staged, self._staged = self._staged, []
        fd, self._sync_fd = self._sync_fd, None
        cur = f"{self.path}/cur/"
        renames: list[tuple[str, str]] = []
        job = _Commit(staged, [], self.next_uid)
        for st in staged:
            name = f"{st.base}:2,{st.letters}"
            renames.append((st.tmp, cur + name))
            job.records.append(Record(st.uid, st.base, name, "cur", st.letters, st.pop3_uidl))
            job.next_uid = max(job.next_uid, st.uid + 1)
        fsync_cur = bool(staged) or self._cur_dirty
        keywords = self._keywords_bytes() if self._keywords_dirty else None
        uidlist = None
        if self._dirty or staged or not (self.path / UIDLIST).exists():
            try:
                uidlist = self._uidlist_bytes(job.records, job.next_uid)
            except BaseException:
                self._failed += staged
                if fd is not None:
                    os.close(fd)
                raise
        self._dirty = self._keywords_dirty = self._cur_dirty = False

        def work() -> None:
            try:
                self._wait_synced_for(staged, fd)  # every file on disk before the first rename
                for src, dst in renames:
                    os.rename(src, dst)
                if fsync_cur:
                    _fsync_dir(self.path / "cur")
                if keywords is not None:
                    self._write_keywords_bytes(keywords)
                if uidlist is not None:
                    write_file_atomic(self.path / UIDLIST, uidlist, self.owner)
            except BaseException as e:
                job.error = e

        self._inflight = job
        if background:
            job.thread = threading.Thread(target=work, name=f"commit {self.path.name}", daemon=True)
            job.thread.start()
        else:
            work()
            self.flush()

    def flush(self) -> None:
        """Wait for the batch committing in the background (if any): its records join `records`, or its error is
        raised (the folder is then to be aborted: abort() removes that batch's files from tmp/)."""
        job, self._inflight = self._inflight, None
        if job is None:
            return
        if job.thread is not None:
            job.thread.join()
        if job.error is not None:
            self._failed += job.staged
            self._dirty = self._keywords_dirty = self._cur_dirty = True  # whatever it did, write it all again
            raise job.error
        for r in job.records:
            self.records[r.uid] = r
        self.next_uid = max(self.next_uid, job.next_uid)

    def _keywords_bytes(self) -> bytes:
        lines = "".join(f"{i} {k}\n" for k, i in sorted(self.keywords.items(), key=lambda kv: kv[1]))
        return lines.encode("utf-8", "surrogateescape")

    def _write_keywords(self) -> None:
        self._write_keywords_bytes(self._keywords_bytes())
        self._keywords_dirty = False

    def _write_keywords_bytes(self, data: bytes) -> None:
        path = self.path / KEYWORDS
        try:
            old_mtime: int | None = int(path.stat().st_mtime)
        except FileNotFoundError:
            old_mtime = None
        write_file_atomic(path, data, self.owner)
        # Dovecot re-reads dovecot-keywords only when its mtime (whole seconds) changed: a process that read
        # it earlier in the same second would map the new letters to "unknown-N". Make the mtime grow.
        if old_mtime is not None and int(path.stat().st_mtime) <= old_mtime:
            os.utime(path, (old_mtime + 1, old_mtime + 1))

    def _write_uidlist(self) -> None:
        write_file_atomic(self.path / UIDLIST, self._uidlist_bytes(), self.owner)

    def _uidlist_bytes(self, extra: list[Record] | None = None, next_uid: int = 0) -> bytes:
        """dovecot-uidlist for `records` plus `extra` (a batch being committed: UIDs above all of them)."""
        if not self.uidvalidity:
            raise MaildirError(f"{self.path}: no UIDVALIDITY set")
        extra = extra or []
        last = extra[-1].uid if extra else self.last_uid
        next_uid = max(self.next_uid, next_uid, last + 1)
        head = " ".join(["3", f"V{self.uidvalidity}", f"N{next_uid}", *self.header_ext])
        out = [head]
        for r in itertools.chain((self.records[uid] for uid in sorted(self.records)), extra):
            fields = [str(r.uid)]
            if r.pop3_uidl:
                fields.append(f"P{r.pop3_uidl}")
            if r.pop3_order is not None:
                fields.append(f"O{r.pop3_order}")
            fields.extend(r.ext)
            out.append(" ".join(fields) + " :" + r.base)
        return ("\n".join(out) + "\n").encode("utf-8", "surrogateescape")

    def _wait_synced(self) -> None:
        """Every staged file is on disk (its fsync, or the batch's syncfs, done); the first error is raised."""
        fd, self._sync_fd = self._sync_fd, None
        self._wait_synced_for(self._staged, fd)

    @staticmethod
    def _wait_synced_for(staged: list[_Staged], fd: int | None) -> None:
        """These staged files are on disk: their own fsyncs done, and a syncfs on fd (closed here) when there is
        one; the first error is raised."""
        errors = []
        for st in staged:
            if st.synced is not None:
                try:
                    st.synced.result()
                except OSError as e:
                    errors.append(e)
                st.synced = None
        if fd is not None:
            try:
                if staged:
                    _syncfs(fd)
            except OSError as e:
                errors.append(e)
            finally:
                os.close(fd)
        if errors:
            raise errors[0]

    def _close_sync_fd(self) -> None:
        fd, self._sync_fd = self._sync_fd, None
        if fd is not None:
            os.close(fd)

    def abort(self) -> None:
        """Drop what was staged and not committed (a batch in flight is waited for first; one that failed is
        dropped too)."""
        with contextlib.suppress(Exception):
            self.flush()
        self._close_sync_fd()  # nothing to make durable
        with contextlib.suppress(OSError):
            self._wait_synced()
        for st in self._failed + self._staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(st.tmp)
        self._staged = []
        self._failed = []


class MaildirAccount:
    """A user's Maildir (home/Maildir) in the target layout."""

    def __init__(self, home: Path, *, owner: Owner = None, layout: TargetLayout = LAYOUT) -> None:
        self.home = home
        self.owner = owner
        self.layout = layout
        self.root = home / layout.maildir

    def ensure(self) -> None:
        """Create home (and missing parents under an existing directory) and the Maildir root, for owner."""
        missing = []
        p = self.root
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            _mkdir(d, self.owner)

    def folder(self, target: str) -> MaildirFolder:
        dirname = to_disk(target, self.layout)
        return MaildirFolder(
            self.root / dirname if dirname else self.root, owner=self.owner, is_inbox=not dirname
        )

    def folders(self) -> list[str]:
        """Target names of the folders present on disk (INBOX included once the root exists)."""
        if not self.root.is_dir():
            return []
        out = ["INBOX"] if (self.root / "cur").is_dir() else []
        for entry in sorted(os.listdir(self.root)):
            if (
                entry.startswith(self.layout.disk_separator)
                and entry not in (".", "..")
                and (self.root / entry / "cur").is_dir()
            ):
                out.append(from_disk(entry, self.layout))
        return out

    def remove_folder(self, target: str) -> None:
        if target == "INBOX":
            raise MaildirError("INBOX cannot be removed")
        dirname = to_disk(target, self.layout)
        shutil.rmtree(self.root / dirname, ignore_errors=True)
        _fsync_dir(self.root)

    def write_subscriptions(self, targets: Iterable[str]) -> None:
        lines = [subscription_line(t, self.layout) for t in sorted(set(targets))]
        data = SUBSCRIPTIONS_HEADER + "".join(line + "\n" for line in lines)
        write_file_atomic(self.root / SUBSCRIPTIONS, data.encode("ascii"), self.owner)

    def read_subscriptions(self) -> list[str]:
        p = self.root / SUBSCRIPTIONS
        if not p.exists():
            return []
        text = p.read_text("ascii", "replace")
        body = text[len(SUBSCRIPTIONS_HEADER) :] if text.startswith(SUBSCRIPTIONS_HEADER) else text
        from imapclient import imap_utf7

        return [
            self.layout.separator.join(imap_utf7.decode(x.encode("ascii")) for x in line.split("\t"))
            for line in body.splitlines()
            if line
        ]
