"""Copier benchmark (run by hand, not a test): our copier vs `doveadm backup -R imapc:` (dsync) in one run.

    sudo .venv/bin/python bench/copier_bench.py [--rounds 1] [--keep] [--baseline CHECKOUT]

The legacy server is the lab's (sidecar.lab.legacy, dovecot profile) holding the reference mailbox made by
sidecar.lab.mailgen.reference_plan / reference_messages (seed 1): 10,000 messages, ~423 MB, 8 folders.
Both tools copy it from the legacy IMAP on loopback into a Maildir of their own (same layout, fsync on: our
copier makes every batch of messages durable before renaming it (one syncfs, else an fsync per message) and
fsyncs directories and metadata; dsync runs with Dovecot's default mail_fsync=optimized, which fsyncs every
saved message). Measured per tool, for its process tree (wait4 rusage): wall time, CPU
user+sys, peak RSS. The legacy Dovecot's own CPU is not counted for either. The legacy Maildir is read once
before the first run so both start with the files in the page cache. imapsync is run when on PATH.

dsync's imapc password: Dovecot 2.3 does not expand %{env:...} in the imapc_password setting itself, so the
target's static userdb returns it as a user field, `imapc_password=%{env:IMAPC_PASSWORD}`, expanded by the
auth process from the environment the bench starts that Dovecot with: never in a file or in argv.

--baseline CHECKOUT (repeatable) also runs the copier of another checkout (say `git worktree add /tmp/base
main`) in each round, right before ours, with the same Python: before and after side by side under the same
load. The
"machine CPU" column is the busy time of all CPUs (/proc/stat) while the tool ran: it includes the legacy
Dovecot serving the copy, and anything else running on a shared machine (compare it with the tool's own CPU).

No copy is deleted before the end of the bench: on ext4, creating files right after ~10,000 were deleted costs
much kernel time (ext4_create -> find_inode_bit -> recently_deleted skips inodes freed in the last minutes, one
inode-table lookup each: 45% of a copier run's samples in `perf record`), and it would fall on whichever tool ran
next (the bench used to delete dsync's copy before our next round).

--fresh-fs KIND gives every copy (ours and dsync's, every round) a file system of its own, made on a loop device
(an image file in the bench's directory), mounted where the copy goes and unmounted after its check: `ext4`
(mkfs.ext4's defaults: with a journal, as Debian installs a mail spool) or `ext4-nojournal`. Every tool then
starts on the same empty file system, whatever the host's file system went through before (a test suite's
deletions, earlier benches), and the journal's cost can be seen: each fsync on a journaled ext4 is a journal
commit. The loop device's writes still reach the disk through the image file. Needs root and loop devices.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
METRICS = ("wall", "cpu", "user", "sys", "rss", "machine", "load")
sys.path.insert(0, str(REPO))

from sidecar.lab import legacy, mailgen  # noqa: E402
from sidecar.lab.proc import free_port, read_pidfile, stop_pid, wait_port  # noqa: E402


def machine_busy() -> float:
    """Seconds of CPU time all CPUs spent not idle since boot (/proc/stat: everything but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_measured(
    argv: list[str], *, stdin: str = "", env: dict[str, str] | None = None, cwd: Path = REPO
) -> dict[str, Any]:
    """Run a command; wall time, CPU (user+sys of it and its reaped children) and peak RSS via wait4."""
    t0 = time.monotonic()
    busy0 = machine_busy()
    p = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, text=True
    )
    assert p.stdin is not None and p.stdout is not None and p.stderr is not None
    # peak RSS: VmHWM sampled while it runs (wait4's ru_maxrss counts the pages of the forking bench process)
    hwm = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm[0] = max(hwm[0], int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                pass
            done.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    p.stdin.write(stdin)
    p.stdin.close()
    out = p.stdout.read()
    err = p.stderr.read()
    _pid, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    busy = machine_busy() - busy0
    done.set()
    sampler.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stdout.close()
    p.stderr.close()
    return {
        "rc": p.returncode,
        "wall": wall,
        "cpu": ru.ru_utime + ru.ru_stime,
        "user": ru.ru_utime,
        "sys": ru.ru_stime,
        "rss": hwm[0],
        "machine": busy,
        "load": os.getloadavg()[0],
        "stdout": out,
        "stderr": err,
    }


FRESH_FS = {"ext4": [], "ext4-nojournal": ["-O", "^has_journal"]}  # mkfs.ext4 options


def fresh_fs(
    kind: str, mountpoint: Path, image: Path, owner: pwd.struct_passwd, size: str = "3G"
) -> contextlib.AbstractContextManager[None]:
    """A new, empty file system of this kind on `mountpoint` for the duration (or nothing: kind "")."""
    if not kind:
        return contextlib.nullcontext()
    return _fresh_fs(FRESH_FS[kind], mountpoint, image, owner, size)


@contextlib.contextmanager
def _fresh_fs(options: list[str], mountpoint: Path, image: Path, owner: pwd.struct_passwd, size: str) -> Iterator[None]:
    """A new, empty ext4 mounted on `mountpoint` (an empty directory) for the duration; the image is removed
    after. Inode tables are written at mkfs time (no lazy init running in the background during the copy)."""
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", *options, str(image)],
                   check=True)  # fmt: skip
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        shutil.rmtree(mountpoint / "lost+found")
        os.chown(mountpoint, owner.pw_uid, owner.pw_gid)
        yield
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
        image.unlink()


def fsync_cost(directory: Path, files: int = 1000, size: int = 42_000) -> float:
    """Milliseconds to create, write and fsync one file of `size` bytes here (the reference mailbox's mean
    message size): what dsync pays per message on top of the copy (mail_fsync=optimized), and ours per batch."""
    probe = directory / "fsync-probe"
    probe.mkdir()
    body = b"x" * size
    t0 = time.monotonic()
    for i in range(files):
        fd = os.open(probe / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
    ms = (time.monotonic() - t0) * 1000 / files
    shutil.rmtree(probe)
    return ms


def target_conf(root: Path, host: str, srv: legacy.LegacyServer) -> Path:
    """A target Dovecot for dsync: static userdb (the user must exist there), imapc pointing at the legacy."""
    vmail = pwd.getpwnam("vmail")
    mail_root = root / "vmail"
    mail_root.mkdir(parents=True)
    os.chown(mail_root, vmail.pw_uid, vmail.pw_gid)
    for d in ("run", "state"):
        (root / d).mkdir()
    imap = free_port(host)
    conf = root / "dovecot.conf"
    conf.write_text(
        f"""base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = {host}
ssl = no
mail_uid = {vmail.pw_uid}
mail_gid = {vmail.pw_gid}
first_valid_uid = 1
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:~/Maildir
mail_home = {mail_root}/%d/%n
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  # the legacy password reaches imapc from the environment of this Dovecot (never a file, never argv)
  args = uid={vmail.pw_uid} gid={vmail.pw_gid} imapc_password=%{{env:IMAPC_PASSWORD}}
}}
namespace inbox {{
  inbox = yes
  separator = /
  prefix =
}}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
# dsync from the legacy server over IMAP, with the settings Dovecot's migration docs recommend
imapc_host = {srv.host}
imapc_port = {srv.imap}
imapc_user = %u
imapc_features = rfc822.size fetch-headers
mail_prefetch_count = 20
import_environment = $import_environment IMAPC_PASSWORD
"""
    )
    return conf


def count_maildir(maildir: Path) -> dict[str, tuple[int, str]]:
    """Folder directory -> (messages in the uidlist, its header)."""
    out = {}
    for d in [maildir, *sorted(p for p in maildir.iterdir() if p.name.startswith(".") and p.is_dir())]:
        ul = d / "dovecot-uidlist"
        if ul.exists():
            lines = ul.read_text().splitlines()
            out[d.name if d != maildir else "INBOX"] = (len(lines) - 1, " ".join(lines[0].split()[:2]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the lab directory")
    ap.add_argument(
        "--fresh-fs",
        choices=sorted(FRESH_FS),
        default="",
        metavar="KIND",
        help="give every copy a new file system of this kind on a loop device: " + ", ".join(FRESH_FS),
    )
    ap.add_argument("--profile", type=Path, help="also run our copier under cProfile, stats to this file")
    ap.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        action="append",
        default=[],
        help="also run the copier of this checkout (before/after); may be repeated",
    )
    ap.add_argument(
        "--connections",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help="run our copier with each of these numbers of IMAP sessions (folders in parallel), side by side",
    )
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="copier-bench-", dir="/tmp"))
    os.chmod(root, 0o755)  # noqa: S103 - Dovecot's unprivileged processes must traverse it
    host = f"127.{random.randint(64, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
    srv = legacy.start_legacy(root / "lab", host=host, users=1, seed=1, messages_per_user=0)
    dovecot_pid = 0
    results: list[dict[str, Any]] = []
    try:
        u = srv.users[0]
        vmail = pwd.getpwnam("vmail")
        maildir = srv.dir / "mail" / u.login / "Maildir"
        shutil.rmtree(maildir)
        t0 = time.monotonic()
        plan = mailgen.reference_plan(u.address, seed=1)
        written = mailgen.write_maildir(
            plan, maildir, owner=(vmail.pw_uid, vmail.pw_gid), messages=mailgen.reference_messages(plan)
        )
        visible = sum(len(f.messages) for f in written.folders.values())
        imap_bytes = sum(m.size for f in written.folders.values() for m in f.messages)
        print(f"reference mailbox: {visible} messages, {imap_bytes / 1e6:.1f} MB, in {time.monotonic() - t0:.1f}s")
        for dirpath, _d, files in os.walk(maildir):  # page cache warm for both tools
            for f in files:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    while fh.read(1 << 20):
                        pass
        legacy_counts = count_maildir(maildir)

        tdir = root / "dsync-target"
        conf = target_conf(tdir, host, srv)
        denv = {"PATH": os.environ["PATH"], "IMAPC_PASSWORD": u.password}
        subprocess.run(["dovecot", "-c", str(conf)], check=True, timeout=30, env=denv)
        dovecot_pid = read_pidfile(tdir / "run" / "master.pid")
        wait_port(host, int(conf.read_text().split("port = ")[1].split()[0]))

        probe_dir = root / "probe"
        probe_dir.mkdir()
        with fresh_fs(args.fresh_fs, probe_dir, root / "copy.img", vmail):
            fs_line = (f"target file system: {args.fresh_fs or 'the host file system of ' + str(root)}; "
                       f"one 42 KB file written and fsynced there: {fsync_cost(probe_dir):.3f} ms")  # fmt: skip

        copiers: list[tuple[str, Path, int]] = []
        for n, checkout in enumerate(args.baseline, start=1):
            label = "baseline copier" if len(args.baseline) == 1 else f"baseline{n} copier"
            copiers.append((label, checkout.resolve(), 1))
        for conns in args.connections:
            copiers.append((f"autoport copier{f' ({conns} sessions)' if conns > 1 else ''}", REPO, conns))
        for rnd in range(args.rounds):
            for label, checkout, conns in copiers:
                home = root / f"{label.split()[0]}-{conns}-{rnd}" / "home"
                home.parent.mkdir(mode=0o755)
                os.chown(home.parent, vmail.pw_uid, vmail.pw_gid)
                with fresh_fs(args.fresh_fs, home.parent, root / "copy.img", vmail):
                    r = copy_ours(checkout, conns, home, host, srv, u.login, u.password)
                    if r["rc"] == 0:
                        ours = json.loads(r["stdout"])
                        assert ours["messages_copied"] == visible, ours["messages_copied"]
                        assert count_maildir(home / "Maildir") == legacy_counts
                if r["rc"] != 0:
                    raise SystemExit(f"{label} failed: {r['stderr'][-2000:]}")
                results.append({"tool": label, "round": rnd, **{k: r[k] for k in METRICS}})

            # dsync
            with fresh_fs(args.fresh_fs, tdir / "vmail", root / "copy.img", vmail):
                r = run_measured(["doveadm", "-c", str(conf), "backup", "-R", "-u", u.address, "imapc:"])
                if r["rc"] != 0:
                    raise SystemExit(f"dsync failed: {r['stderr'][-2000:]}")
                dhome = tdir / "vmail" / srv.domain / u.address.split("@")[0] / "Maildir"
                dcounts = count_maildir(dhome)
                assert {k: v[0] for k, v in dcounts.items()} == {k: v[0] for k, v in legacy_counts.items()}, dcounts
                if not args.fresh_fs:
                    dhome.parent.rename(tdir / f"dsync-round-{rnd}")  # out of the way, not deleted (module doc)
            results.append({"tool": "dsync (doveadm backup -R imapc:)", "round": rnd, **{k: r[k] for k in METRICS}})

        if args.profile:
            home = root / "profiled" / "home"
            home.parent.mkdir(mode=0o755)
            with fresh_fs(args.fresh_fs, home.parent, root / "copy.img", vmail):  # the same file system as the copies
                r = run_measured(
                    [sys.executable, "-m", "cProfile", "-o", str(args.profile), "-m", "sidecar.migration.copier",
                     "--host", host,
                     "--imap-port", str(srv.imap), "--user", u.login, "--home", str(home)],
                    stdin=u.password + "\n",
                )  # fmt: skip
            print(f"profiled run: wall {r['wall']:.2f}s cpu {r['cpu']:.2f}s, stats in {args.profile}")
        if shutil.which("imapsync"):
            print("imapsync is on PATH but not wired into this benchmark")
        else:
            print("imapsync: not on PATH, not run")
        print()
        print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
              f"{_cpu_model()}, Python {platform.python_version()}, {_dovecot_version()}")  # fmt: skip
        print(fs_line)
        print()
        for label, checkout, _conns in copiers:
            print(f"{label}: {checkout} ({_git_head(checkout)})")
        print("| tool | round | wall s | msg/s | MB/s | CPU s (user+sys) | machine CPU s | load | peak RSS MB "
              "| wall vs dsync | CPU vs dsync |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for rnd in range(args.rounds):
            ds = next(x for x in results if x["round"] == rnd and x["tool"].startswith("dsync"))
            for x in (x for x in results if x["round"] == rnd):
                print(
                    f"| {x['tool']} | {rnd + 1} | {x['wall']:.2f} | {visible / x['wall']:.0f} | "
                    f"{imap_bytes / 1e6 / x['wall']:.1f} | {x['cpu']:.2f} ({x['user']:.2f}+{x['sys']:.2f}) | "
                    f"{x['machine']:.2f} | {x['load']:.1f} | "
                    f"{x['rss'] / 2**20:.1f} | {x['wall'] / ds['wall']:.2f} | {x['cpu'] / ds['cpu']:.2f} |"
                )
    finally:
        if dovecot_pid:
            stop_pid(dovecot_pid)
        legacy.stop_legacy(root / "lab")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def copy_ours(
    checkout: Path, conns: int, home: Path, host: str, srv: legacy.LegacyServer, login: str, password: str
) -> dict[str, Any]:
    """One run of a checkout's copier (the password on stdin), measured."""
    return run_measured(
        [sys.executable, "-m", "sidecar.migration.copier", "--host", host, "--imap-port", str(srv.imap),
         "--pop3-port", str(srv.pop3), "--user", login, "--home", str(home),
         *(["--connections", str(conns)] if conns > 1 else [])],
        stdin=password + "\n",
        env={**os.environ, "PYTHONPATH": str(checkout)},
        cwd=checkout,
    )  # fmt: skip


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _git_head(checkout: Path) -> str:
    p = subprocess.run(
        ["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=False
    )
    return p.stdout.strip()[:80] or "not a git checkout"


def _dovecot_version() -> str:
    p = subprocess.run(["dovecot", "--version"], capture_output=True, text=True, check=False)
    return f"Dovecot {p.stdout.strip()}"


if __name__ == "__main__":
    sys.exit(main())
