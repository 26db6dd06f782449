"""Per-account cost of migrating small mailboxes (run by hand, not a test): the sidecar's CPU, and that of the
commands it runs (doveadm, postqueue, sendmail), per account, side by side with another checkout.

    .venv/bin/python bench/account_bench.py [--users 200] [--messages 2] [--rounds 2] [--baseline DIR] [--debian13]

Each round starts one lab per version (dovecot profile, SQLite store, default limits, the lab's 1 s cutover
grace) with --users legacy accounts of --messages small messages, logs every user in once over IMAP from 10
client threads (each login a first login: the sidecar checks the password on the legacy server and queues the
copy), then waits until every account is `migrated`. Measured from /proc/PID/stat of the sidecar process from
just before the first login to the moment the last account is migrated: its own CPU (utime, stime: the auth
path, the argon2 hash of each password, the copies, cutovers) and its reaped children's (cutime, cstime:
every doveadm, postqueue and sendmail it ran), per account; and the copy phase's wall time (last login to the
last account migrated). Dovecot's and Postfix's daemons are not counted.

--baseline DIR runs the same with the `sidecar` package of another checkout (PYTHONPATH=DIR, so the lab's
sidecar runs that code), alternating which version goes first in each round. --debian13 also runs each
checkout with a lab whose target Postfix and Dovecot (2.4) run from the Debian 13 root (`make debroot`): the
commands the sidecar runs (doveadm) then run there, in the lab through a chroot wrapper (about 2 ms of CPU
each, counted too).
Needs root, like the lab.
"""

from __future__ import annotations

import argparse
import contextlib
import imaplib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CLK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int) -> list[float]:
    """utime, stime, cutime, cstime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return [int(x) / CLK for x in fields[11:15]]


def one_run(users: int, messages: int, debian13: bool) -> dict[str, Any]:
    """In this process (PYTHONPATH chooses the version): one lab, every user logs in once, all migrate."""
    from sidecar.lab import debroot, launcher

    sysroot = debroot.ensure() if debian13 else None
    parent = None
    if sysroot is not None:
        # not debroot.new_lab_dir: this runs with a --baseline checkout's sidecar too, which may predate it
        parent = debroot.lab_parent(sysroot)  # the chrooted services see the lab at the same path
        parent.mkdir(mode=0o755, exist_ok=True)
    lab = Path(tempfile.mkdtemp(prefix="ab-", dir=parent))
    os.chmod(lab, 0o755)  # noqa: S103 - the mail daemons' users reach sockets inside
    try:
        info = launcher.lab_up(lab, users=users, messages_per_user=messages, sysroot=sysroot)
        pid = json.loads((lab / "lab-state.json").read_text())["pids"]["sidecar"]
        host, port = info["target"]["host"], info["target"]["imap"]
        todo = list(info["users"])
        lock = threading.Lock()
        failed: list[str] = []
        retried: list[str] = []

        def client() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    u = todo.pop()
                for attempt in range(3):  # a temporary NO ([UNAVAILABLE]) is retried, as a client would
                    try:
                        c = imaplib.IMAP4(host, port)
                        c.login(u["login"], u["password"] or "")
                        c.logout()
                        break
                    except (imaplib.IMAP4.error, OSError) as e:
                        with lock:
                            retried.append(f"{u['login']}: {e}")
                        if attempt == 2:
                            with lock:
                                failed.append(f"{u['login']}: {e}")
                        time.sleep(1)

        c0, t0 = cpu(pid), time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t1 = time.monotonic()
        if failed:
            raise SystemExit(f"{len(failed)} login(s) failed: {failed[:3]}")
        status = [sys.executable, "-c", "import sys; from sidecar.ops.cli import main; sys.exit(main())",
                  "--config", info["config"], "status", "--json"]  # fmt: skip
        while True:
            out = subprocess.run(status, capture_output=True, text=True, check=True).stdout
            if json.loads(out)["accounts"]["migrated"] >= users:
                break
            if time.monotonic() - t1 > 1200:
                raise SystemExit(f"not all migrated after 1200 s: {out}")
            time.sleep(0.5)
        c1, t2 = cpu(pid), time.monotonic()
        per = [(b - a) * 1000 / users for a, b in zip(c0, c1, strict=True)]
        return {"own_user": per[0], "own_sys": per[1], "children_user": per[2], "children_sys": per[3],
                "logins_s": t1 - t0, "copy_phase_s": t2 - t1, "retried": len(retried),
                "retried_first": retried[0] if retried else ""}  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            launcher.lab_down(lab)
        shutil.rmtree(lab, ignore_errors=True)


def run_version(path: Path | None, users: int, messages: int, debian13: bool) -> dict[str, Any]:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = str(path)
    else:
        env.pop("PYTHONPATH", None)
    argv = [sys.executable, __file__, "--one", str(users), str(messages), str(int(debian13))]
    p = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"run failed ({path or 'this checkout'}):\n{p.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--messages", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", type=Path, help="another checkout's root, run side by side")
    ap.add_argument("--debian13", action="store_true", help="also this checkout with the target on Dovecot 2.4")
    ap.add_argument("--one", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        users, messages, debian13 = args.one
        print(json.dumps(one_run(users, messages, bool(debian13))))
        return
    checkouts: list[tuple[str, Path | None]] = [("this checkout", None)]
    if args.baseline:
        checkouts.append((f"baseline {args.baseline}", args.baseline.resolve()))
    versions = [(name, path, False) for name, path in checkouts]
    if args.debian13:  # every checkout on both targets
        versions += [(f"{name}, target on Debian 13 (Dovecot 2.4)", path, True) for name, path in checkouts]
    head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True,
                          text=True, check=False).stdout.strip()  # fmt: skip
    print(f"machine: {os.uname().machine}, nproc {os.cpu_count()}, Python {sys.version.split()[0]}; "
          f"this checkout: {head[:70]}; load average before: {os.getloadavg()}")  # fmt: skip
    print(f"{args.users} accounts of {args.messages} messages, {args.rounds} round(s)\n")
    print(
        "| version | round | sidecar CPU ms/account (user+sys) | its commands' CPU ms/account (user+sys) "
        "| total ms/account | copy phase s | logins s | logins retried |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in range(args.rounds):
        order = versions if r % 2 == 0 else list(reversed(versions))
        for name, path, debian13 in order:
            m = run_version(path, args.users, args.messages, debian13)
            own = m["own_user"] + m["own_sys"]
            kids = m["children_user"] + m["children_sys"]
            print(f"| {name} | {r + 1} | {own:.1f} ({m['own_user']:.1f}+{m['own_sys']:.1f}) | {kids:.1f} "
                  f"({m['children_user']:.1f}+{m['children_sys']:.1f}) | {own + kids:.1f} | "
                  f"{m['copy_phase_s']:.1f} | {m['logins_s']:.1f} | {m['retried']} {m['retried_first']} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
