"""Copy slots (run by hand, not a test): a job waiting in cutover holds its slot (before) or gives it back (after).

    sudo .venv/bin/python bench/slots_bench.py [--users 24] [--messages 20] [--grace 3] [--slots 4] [--rounds 2]

A lab legacy server (dovecot profile) with --users mailboxes of --messages messages each. Per round and mode, a
fresh SQLite store and target mail root, every account queued as after its first login, and the real JobRunner
(sidecar/migration/jobs.py) with the real copier and the legacy admin login, `limits.copy_concurrency` = --slots,
`limits.cutover_grace` = --grace. The cutover hooks stand in for the node actions: the wait is the grace alone
(no kick round, no route-cache wait, which only make the wait longer); releasing held mail and kicking sessions
do nothing. Modes, alternating within a round:
  held      Slot.away() keeps the slot through the wait (the runner before issue 17)
  released  the runner as it is: the slot goes back for the wait, the final delta takes one again
Measured: wall time from the first lease to the last account migrated, accounts per second, how long each
account's mail was held (cutover -> migrated, from the store's events), our CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sidecar import config  # noqa: E402
from sidecar.lab import legacy  # noqa: E402
from sidecar.migration import jobs  # noqa: E402
from sidecar.states import State  # noqa: E402
from sidecar.store import open_store  # noqa: E402

_released_away = jobs.Slot.away


@contextlib.contextmanager
def _held_away(self: jobs.Slot) -> Iterator[None]:
    yield  # the slot stays taken through the wait


class _NoCredentials:
    def get(self, address: str) -> Any:
        return None  # the admin login copies

    def pop(self, address: str) -> Any:
        return None


def run(mode: str, root: Path, legacy_cfg: dict[str, Any], domain: str, users: list[Any], args: Any) -> dict[str, Any]:
    work = root / f"{mode}-{time.monotonic_ns()}"
    work.mkdir()
    cfg = config.from_dict({"legacy": legacy_cfg, "target": {"mail_root": str(work / "mail")},
                            "mail": {"domains": [domain]},
                            "limits": {"copy_concurrency": args.slots, "cutover_grace": args.grace}})  # fmt: skip
    store = open_store(f"sqlite:///{work / 'state.db'}")
    store.init()
    for u in users:
        store.transition(u.address, State.COPYING, reason="first login")
        store.enqueue(u.address, "copy")
    hooks = jobs.Hooks(release_held=lambda a: 0, after_migrated=lambda a, logins: None)
    jobs.Slot.away = _held_away if mode == "held" else _released_away  # type: ignore[method-assign,assignment]
    runner = jobs.JobRunner(cfg, store, _NoCredentials(), owner="bench", hooks=hooks)
    cpu0, wall0 = time.process_time(), time.monotonic()
    runner.start()
    try:
        while sum(1 for u in users if store.state_of(u.address) is State.MIGRATED) < len(users):
            if any(store.state_of(u.address) is State.FAILED for u in users):
                raise SystemExit(f"{mode}: an account failed: {[store.get(u.address) for u in users][:3]}")
            time.sleep(0.05)
        wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    finally:
        runner.stop()
        jobs.Slot.away = _released_away  # type: ignore[method-assign]
    held = []
    copied = 0
    for u in users:
        at = {e.detail.split(":")[0]: e.at for e in store.events(u.address) if e.kind == "transition"}
        held.append(at["cutover -> migrated"] - at["copying -> cutover"])
        account = store.get(u.address)
        copied += account.bytes_copied if account else 0
    store.close()
    shutil.rmtree(work, ignore_errors=True)
    held.sort()
    return {"wall": wall, "cpu": cpu, "rate": len(users) / wall, "held_p50": statistics.median(held),
            "held_max": held[-1], "bytes": copied}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--messages", type=int, default=20)
    ap.add_argument("--grace", type=float, default=3.0)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="slots-bench-", dir="/tmp"))
    os.chmod(root, 0o755)  # noqa: S103 - Dovecot's unprivileged processes must traverse it
    host = f"127.{random.randint(64, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
    load = os.getloadavg()
    srv = legacy.start_legacy(root / "lab", host=host, users=args.users, seed=1, messages_per_user=args.messages)
    try:
        rows: list[tuple[int, str, dict[str, Any]]] = []
        for n in range(1, args.rounds + 1):
            modes = ("held", "released") if n % 2 else ("released", "held")
            for mode in modes:
                r = run(mode, root, srv.legacy_config(), srv.domain, srv.users, args)
                rows.append((n, mode, r))
                print(f"round {n} {mode}: {r['wall']:.1f} s", flush=True)
        mb = rows[0][2]["bytes"] / len(srv.users) / 1e6
        print(f"\n{len(srv.users)} accounts of {args.messages} messages ({mb:.2f} MB each), copy_concurrency = "
              f"{args.slots}, cutover_grace = {args.grace:g} s; load average before {load[0]:.2f}, "
              f"after {os.getloadavg()[0]:.2f}\n")
        print("| round | slot during the wait | wall (all migrated) | accounts/s | mail held p50 | held max "
              "| our CPU |")
        print("|---|---|---|---|---|---|---|")
        for n, mode, r in rows:
            print(f"| {n} | {mode} | {r['wall']:.1f} s | {r['rate']:.2f} | {r['held_p50']:.1f} s | "
                  f"{r['held_max']:.1f} s | {r['cpu']:.1f} s |")
        print()
        for n in range(1, args.rounds + 1):
            by = {mode: r for m, mode, r in rows if m == n}
            print(f"round {n}: held / released wall = {by['held']['wall'] / by['released']['wall']:.2f}x")
    finally:
        legacy.stop_legacy(root / "lab")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
