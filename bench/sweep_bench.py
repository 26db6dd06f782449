"""Trailing-sweep cost (run by hand, not a test): the STATUS check before any FETCH vs the append pass alone.

    sudo .venv/bin/python bench/sweep_bench.py [--users 200] [--messages 30] [--keep]

A lab legacy server (dovecot profile) with --users mailboxes of --messages messages each; every account copied to a
target Maildir (initial + delta, the admin master login) and marked migrated in a SQLite store, as after a real
migration. Then, per account, one sweep as the job runner does it:
  append   the pass alone (before): login, LIST, STATUS per folder, EXAMINE per folder, the target's uidlist read
           and locked per folder, FETCH of anything above the watermark;
  checked  sidecar.migration.sweep.changed_folders first (login, LIST, STATUS per folder, compared with the
           watermarks in the store), the append pass only when a folder changed.
Two rounds each: nothing new anywhere, then one new message in 5% of the legacy INBOXes (appended as the admin).
Measured: wall time for all accounts (one at a time), our CPU (process time), per account in ms.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sidecar import config  # noqa: E402
from sidecar.lab import legacy  # noqa: E402
from sidecar.migration.copier import SourceParams, copy_account, target_home  # noqa: E402
from sidecar.migration.sweep import changed_folders  # noqa: E402
from sidecar.states import State  # noqa: E402
from sidecar.store import open_store  # noqa: E402
from sidecar.store.base import Store  # noqa: E402


def sweep_round(cfg: config.Config, store: Store, users: list[Any], checked: bool) -> dict[str, float]:
    wall0, cpu0 = time.monotonic(), time.process_time()
    passes = found = 0
    for u in users:
        src = SourceParams.from_config(cfg.legacy, u.login, use_admin=True)
        home = target_home(cfg.target.mail_root, u.address)
        if checked and not changed_folders(src, store, u.address):
            continue
        passes += 1
        found += copy_account(src, home, store, u.address, mode="append").messages_copied
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    n = len(users)
    return {"wall_s": wall, "cpu_s": cpu, "ms_per_account": wall / n * 1000, "cpu_ms_per_account": cpu / n * 1000,
            "append_passes": passes, "found": found}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--messages", type=int, default=30)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sweep-bench-", dir="/tmp"))
    os.chmod(root, 0o755)  # noqa: S103 - Dovecot's unprivileged processes must traverse it
    host = f"127.{random.randint(64, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
    t0 = time.monotonic()
    srv = legacy.start_legacy(root / "lab", host=host, users=args.users, seed=1, messages_per_user=args.messages)
    print(f"legacy server with {args.users} mailboxes of {args.messages} messages in {time.monotonic() - t0:.1f}s")
    try:
        cfg = config.from_dict({"legacy": srv.legacy_config(), "target": {"mail_root": str(root / "mail")},
                                "mail": {"domains": [srv.domain]}})  # fmt: skip
        store = open_store(f"sqlite:///{root / 'state.db'}")
        store.init()
        t0 = time.monotonic()
        for u in srv.users:
            store.transition(u.address, State.COPYING)
            src = SourceParams.from_config(cfg.legacy, u.login, use_admin=True)
            home = target_home(cfg.target.mail_root, u.address)
            copy_account(src, home, store, u.address, mode="initial")
            store.transition(u.address, State.CUTOVER)
            copy_account(src, home, store, u.address, mode="delta")
            store.transition(u.address, State.MIGRATED)
        print(f"{len(srv.users)} accounts copied and migrated in {time.monotonic() - t0:.1f}s")
        rows = []
        for label, checked in (("append pass alone (before)", False), ("STATUS check first (after)", True)):
            rows.append((f"{label}, nothing new", sweep_round(cfg, store, srv.users, checked)))
        import imapclient

        for checked, label in ((False, "append pass alone (before)"), (True, "STATUS check first (after)")):
            hit = srv.users[:: 20]
            for u in hit:  # one new message in 5% of the legacy INBOXes
                with imapclient.IMAPClient(host, port=srv.imap, ssl=False) as c:
                    c.login(f"{u.login}{cfg.legacy.master_separator}{srv.admin_user}", srv.admin_password)
                    mid = f"<bench-{time.time_ns()}@sweep.test>"
                    c.append("INBOX", f"Message-ID: {mid}\r\nSubject: late\r\n\r\nlate\r\n".encode())
            rows.append((f"{label}, 5% with a new message", sweep_round(cfg, store, srv.users, checked)))
        print(f"\n{len(srv.users)} migrated accounts, {args.messages} messages each, one sweep of every account:\n")
        print("| sweep | wall (all accounts) | per account | our CPU per account | append passes | found |")
        print("|---|---|---|---|---|---|")
        for label, r in rows:
            print(f"| {label} | {r['wall_s']:.2f} s | {r['ms_per_account']:.1f} ms | {r['cpu_ms_per_account']:.1f} ms"
                  f" | {r['append_passes']} | {r['found']} |")  # fmt: skip
        store.close()
    finally:
        legacy.stop_legacy(root / "lab")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
