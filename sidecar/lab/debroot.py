"""A Debian 13 (trixie) root with its own Dovecot 2.4 and Postfix 3.10, for the lab and the tests.

    root = debroot.ensure()                 # build once per machine (cached), or DebrootError saying why not
    bin_dir = debroot.write_wrappers(root, lab_dir / "bin")   # doveadm, postfix, ... run inside the root
    os.environ["PATH"] = f"{bin_dir}:{os.environ['PATH']}"    # the lab (and the sidecar) now use them

The root is built with ``debootstrap --variant=minbase`` from deb.debian.org into a temporary directory beside
DEFAULT_ROOT and renamed into place only when complete (a stamp file marks it), under a lock: a half-built root
is never used, and a second builder waits for the first. Built once per machine; `autoport lab debroot` (or the
first 2.4 test) builds it.

More (the reasons and limits behind this module): docs/modules.md, sidecar/lab/debroot.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

DEFAULT_ROOT = Path(os.environ.get("AUTOPORT_DEBIAN13_ROOT", "/var/cache/autoport/debian13-root"))
SUITE = "trixie"
MIRROR = "http://deb.debian.org/debian"
STAMP = ".autoport-debroot"
STAMP_VERSION = "1"  # bump when PACKAGES or the post-configuration change: the root is rebuilt
PACKAGES = (
    "dovecot-core", "dovecot-imapd", "dovecot-pop3d", "dovecot-lmtpd", "dovecot-sqlite", "dovecot-pgsql",
    "dovecot-auth-lua", "dovecot-sieve", "dovecot-managesieved", "postfix", "postfix-sqlite", "postfix-pgsql",
    "lua-socket", "sqlite3", "procps", "ca-certificates",
)  # fmt: skip
# installed with apt inside the root afterwards: debootstrap's resolver cannot pick providers of virtual
# packages (python3-cryptography needs python3-cffi-backend-api-*), apt can
APT_PACKAGES = ("ansible-core",)
# the accounts whose numeric ids must agree between host and root (files and sockets cross the boundary)
USERS = ("dovecot", "dovenull", "postfix", "vmail")
GROUPS = ("dovecot", "dovenull", "postfix", "postdrop", "vmail")
TOOLS = ("dovecot", "doveadm", "doveconf", "postfix", "postconf", "postqueue", "postsuper", "sendmail", "postmap")
LAB_PARENT = "l"  # labs live in ROOT/l/
BUILD_TIMEOUT = 3600.0


class DebrootError(Exception):
    """The root could not be built or used; the message says which step failed and why."""


def ready(root: Path = DEFAULT_ROOT) -> bool:
    """Whether a complete root of the current recipe is at `root`."""
    try:
        return (root / STAMP).read_text().strip() == STAMP_VERSION
    except OSError:
        return False


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure(root: Path = DEFAULT_ROOT, *, mirror: str = MIRROR, log: Path | None = None) -> Path:
    """The root at `root`, built first when missing or stale. DebrootError names the failing step."""
    if ready(root):
        return root
    if os.geteuid() != 0:
        raise DebrootError("building the Debian 13 root needs root (debootstrap, chroot)")
    if not shutil.which("debootstrap"):
        raise DebrootError("debootstrap is not installed (apt-get install debootstrap)")
    with _lock(root):
        if ready(root):  # built by someone else while we waited
            return root
        for stale in root.parent.glob(f".{root.name}.build.*"):  # a builder killed halfway (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.build.", dir=root.parent))
        try:
            _debootstrap(tmp, mirror, log)
            _apt_install(tmp, log)
            _configure(tmp, root)
            (tmp / STAMP).write_text(STAMP_VERSION + "\n")
            if root.exists() or root.is_symlink():
                old = root.parent / f".{root.name}.old.{os.getpid()}"
                os.rename(root, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root


def _debootstrap(target: Path, mirror: str, log: Path | None) -> None:
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(target), mirror]
    out = log or Path(tempfile.gettempdir()) / "autoport-debroot.log"
    start = time.monotonic()
    with open(out, "ab") as f:
        try:
            rc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT,
                check=False, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            raise DebrootError(f"debootstrap {SUITE} from {mirror} timed out; see {out}") from None
    if rc != 0:
        tail = out.read_text(errors="replace").strip().splitlines()[-3:]
        raise DebrootError(f"debootstrap {SUITE} from {mirror} failed (exit {rc}): {' | '.join(tail)} (log: {out})")
    with open(out, "a") as f:
        f.write(f"debootstrap took {time.monotonic() - start:.0f}s\n")


def _apt_install(target: Path, log: Path | None) -> None:
    out = log or Path(tempfile.gettempdir()) / "autoport-debroot.log"
    argv = ["chroot", str(target), "apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    with open(out, "ab") as f:
        rc = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT,
            check=False, env=env,
        ).returncode  # fmt: skip
    if rc != 0:
        raise DebrootError(f"apt-get install {' '.join(APT_PACKAGES)} in the root failed (exit {rc}); see {out}")


def _configure(tmp: Path, final: Path) -> None:
    # the root's own host path leads back to its top: one path string, the same file on both sides
    link = tmp / str(final).lstrip("/")
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to("/")
    (tmp / LAB_PARENT).mkdir(mode=0o755, exist_ok=True)
    os.chmod(tmp, 0o755)  # noqa: S103 - mkdtemp made it 0700: the mail daemons' users must reach labs inside it
    _ensure_vmail(tmp)
    align_ids(tmp)
    # nothing in the root starts by itself (no init); the packages' own instances are never used
    for conf in ("etc/dovecot/dovecot.conf",):
        if not (tmp / conf).exists():
            raise DebrootError(f"{conf} missing in the root: dovecot-core did not install")


def _ensure_vmail(root: Path) -> None:
    passwd = (root / "etc/passwd").read_text()
    if any(line.startswith("vmail:") for line in passwd.splitlines()):
        return
    subprocess.run(
        ["chroot", str(root), "/usr/sbin/useradd", "--system", "--user-group", "--home-dir", "/nonexistent",
         "--no-create-home", "--shell", "/usr/sbin/nologin", "vmail"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def _read_db(path: Path) -> list[list[str]]:
    return [line.split(":") for line in path.read_text().splitlines() if line]


def _write_db(path: Path, rows: list[list[str]]) -> None:
    path.write_text("".join(":".join(r) + "\n" for r in rows))


def _remap(rows: list[list[str]], want: dict[str, int], free_from: int) -> dict[int, int]:
    """Give the named rows their wanted id (column 2), moving colliding rows to free ids; old -> new ids."""
    used = {int(r[2]) for r in rows}
    wanted_ids = set(want.values())
    moves: dict[int, int] = {}
    nxt = free_from
    for r in rows:
        old = int(r[2])
        if r[0] in want:
            new = want[r[0]]
        elif old in wanted_ids:
            while nxt in used or nxt in wanted_ids:
                nxt += 1
            new = nxt
            used.add(new)
        else:
            continue
        if new != old:
            moves[old] = new
            r[2] = str(new)
    return moves


def align_ids(root: Path) -> tuple[dict[int, int], dict[int, int]]:
    """Give the root's USERS and GROUPS the host's numeric ids; (uid moves, gid moves) applied to the files."""
    host_users = {n: pwd.getpwnam(n) for n in USERS if _exists(pwd.getpwnam, n)}
    host_groups = {n: grp.getgrnam(n).gr_gid for n in GROUPS if _exists(grp.getgrnam, n)}
    passwd = _read_db(root / "etc/passwd")
    group = _read_db(root / "etc/group")
    gid_moves = _remap(group, host_groups, 900)
    uid_moves = _remap(passwd, {n: p.pw_uid for n, p in host_users.items()}, 900)
    for r in passwd:  # primary groups follow their group's new id
        if int(r[3]) in gid_moves:
            r[3] = str(gid_moves[int(r[3])])
    _write_db(root / "etc/passwd", passwd)
    _write_db(root / "etc/group", group)
    if uid_moves or gid_moves:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                uid, gid = uid_moves.get(st.st_uid, -1), gid_moves.get(st.st_gid, -1)
                if uid != -1 or gid != -1:
                    mode = st.st_mode
                    os.lchown(p, uid, gid)
                    if not os.path.islink(p) and mode & 0o6000:
                        os.chmod(p, mode & 0o7777)  # chown clears setuid/setgid (postdrop's postqueue)
        top = os.lstat(root)
        if top.st_uid in uid_moves or top.st_gid in gid_moves:
            os.lchown(root, uid_moves.get(top.st_uid, -1), gid_moves.get(top.st_gid, -1))
    return uid_moves, gid_moves


def _exists(lookup: object, name: str) -> bool:
    try:
        lookup(name)  # type: ignore[operator]
    except KeyError:
        return False
    return True


def write_wrappers(root: Path, bin_dir: Path) -> Path:
    """bin_dir with one script per TOOL running it inside the root; put bin_dir first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        # absolute inside the root, with the root's own PATH: bin_dir is visible in there too (same path)
        script = (
            "#!/bin/sh\n"
            f"# autoport lab: {tool} of the Debian 13 root {root}\n"
            f'exec chroot {root} /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin {tool} "$@"\n'
        )
        path = bin_dir / tool
        path.write_text(script)
        path.chmod(0o755)
    return bin_dir


def lab_parent(root: Path = DEFAULT_ROOT) -> Path:
    """Where labs on this root live (inside it, so chrooted services see them at the same path)."""
    return root / LAB_PARENT


def new_lab_dir(root: Path, prefix: str) -> Path:
    """A fresh lab directory inside the root (the chrooted services see it at the same path), traversable by the
    mail daemons' users. Keep the prefix short: the lab's UNIX socket paths must fit."""
    parent = lab_parent(root)
    parent.mkdir(mode=0o755, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(d, 0o755)  # noqa: S103 - the mail daemons' users reach sockets inside
    return d


def tool_version(root: Path, *argv: str) -> str:
    """The first line a command prints inside the root (e.g. `dovecot --version`)."""
    p = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True, timeout=60, check=False)
    return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr).strip() else ""


def size_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
