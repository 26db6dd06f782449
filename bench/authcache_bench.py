"""Repeat native logins with Dovecot's auth cache (run by hand, not a test): the target against plain Dovecot.

    .venv/bin/python bench/authcache_bench.py [--logins 300] [--warmup 20] [--pool 10] [--seed 1] [--json FILE]

One lab (sidecar.lab.launcher, dovecot profile, SQLite store, empty mailboxes, copy_concurrency = 0). --pool
accounts log in once through pass-through (stores their argon2id hash), are moved copying -> cutover -> migrated
through the store, and the target's auth cache is flushed for them, as the job runner does after the switch.
Three more Dovecot instances are copies of the target's rendered configuration (bench/login_bench.start_copy:
own base_dir, state_dir, log, sockets and IMAP port; same store, mail root and hashes). Every round logs one pool
account in on each of the four, in a shuffled order (seeded); the first --warmup rounds are not counted. The
pool is small against the rounds, so after warm-up every login is a repeat login of a cached account.

Cases (each a plain IMAP session: connect, greeting, LOGIN, LOGOUT):
  chain-cache     the target as rendered: passdb chain sql -> sql deny -> checkpassword, auth cache on
  chain-nocache   the same chain with auth_cache_size = 0 (the target before the cache)
  plain           plain Dovecot: the sql passdb alone, no auth cache (Dovecot's default)
  plain-cache     the sql passdb alone with the target's cache settings

After the run, one account's hash is replaced in the store without a flush and its old password tried on each
instance: accepted only where Dovecot answers from its cache (the check that the cache is in use, and the hazard
the flushes exist for).

The sidecar must not answer any of these logins (its log's `auth ok...` decisions are counted: a stale
"unknown user" in the cache would send them there, to be checked against the stored hash: `ok-local-hash`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from benchlib import LoginFailed, loadavg, summary  # noqa: E402
from login_bench import imap_login, start_copy  # noqa: E402

from sidecar import config as config_mod  # noqa: E402
from sidecar.lab import launcher  # noqa: E402
from sidecar.migration.cutover import flush_auth_cache  # noqa: E402
from sidecar.states import State  # noqa: E402
from sidecar.store import open_store  # noqa: E402

CASES = ("chain-cache", "chain-nocache", "plain", "plain-cache")


def run(args: argparse.Namespace) -> dict[str, Any]:
    lab_dir = Path(tempfile.mkdtemp(prefix="acb-", dir="/tmp"))
    os.chmod(lab_dir, 0o755)  # noqa: S103 - the mail daemons' users reach sockets inside
    result: dict[str, Any] = {"load_before": loadavg(), "users": args.pool}
    try:
        info = launcher.lab_up(lab_dir, users=args.pool, messages_per_user=0,
                               settings={"limits": {"copy_concurrency": 0}})  # fmt: skip
        tg = info["target"]
        pool = info["users"]
        cfg = config_mod.load(info["config"])
        store = open_store(info["store"])
        for u in pool:
            imap_login(tg["host"], tg["imap"], u["login"], u["password"])
        for u in pool:
            deadline = time.monotonic() + 10  # the hash is stored right after the answer
            while (a := store.get(u["address"])) is not None and not a.has_password and time.monotonic() < deadline:
                time.sleep(0.05)
            store.transition(u["address"], State.CUTOVER, expect=State.COPYING, reason="bench: copy done")
            store.transition(u["address"], State.MIGRATED, expect=State.CUTOVER, reason="bench: delta done")
        store.close()
        result["flush"] = flush_auth_cache(cfg, [n for u in pool for n in (u["login"], u["address"])])
        endpoints = {
            "chain-cache": (tg["host"], tg["imap"]),
            "chain-nocache": start_copy(info, "chain-nocache", sql_only=False, cache_size="0"),
            "plain": start_copy(info, "plain", sql_only=True, cache_size="0"),
            "plain-cache": start_copy(info, "plain-cache", sql_only=True),
        }
        sidecar_log = Path(info["logs"]) / "sidecar.log"
        mark = sidecar_log.stat().st_size

        def case(name: str, i: int) -> Callable[[], tuple[float, float]]:
            u = pool[(i + CASES.index(name)) % len(pool)]
            host, port = endpoints[name]
            return lambda: imap_login(host, port, u["login"], u["password"])

        rng = random.Random(args.seed)
        samples: dict[str, dict[str, list[float]]] = {c: {"login": [], "session": []} for c in CASES}
        result["load_start"] = loadavg()
        t_run = time.monotonic()
        for i in range(args.warmup + args.logins):
            order = list(CASES)
            rng.shuffle(order)
            for name in order:
                login_ms, session_ms = case(name, i)()
                if i >= args.warmup:
                    samples[name]["login"].append(login_ms)
                    samples[name]["session"].append(session_ms)
        result["run_s"] = time.monotonic() - t_run
        result["load_end"] = loadavg()
        # the caches really answer: replace one account's hash in the store WITHOUT a flush; the old password
        # still logs in where the hash is cached, and only there
        from sidecar.auth import passwords

        u = pool[0]
        store = open_store(info["store"])
        store.set_password_hash(u["address"], passwords.hash_password(u["password"] + "-other", cfg.hash))
        store.close()
        stale: dict[str, bool] = {}
        for name in CASES:
            host, port = endpoints[name]
            try:
                imap_login(host, port, u["login"], u["password"])
                stale[name] = True
            except LoginFailed:
                stale[name] = False
        result["stale_hash_accepted"] = stale
        tail = sidecar_log.read_bytes()[mark:].decode(errors="replace")
        result["sidecar_answers"] = len(re.findall(r"auth ok\S* account=", tail))
        result["cases"] = {c: {k: summary(v) for k, v in samples[c].items()} for c in CASES}
        result["raw"] = samples
        result["hash"] = f"{cfg.hash.scheme} m={cfg.hash.argon2_memory_kib} KiB t={cfg.hash.argon2_time_cost}"
        result["cache"] = (f"auth_cache_size {cfg.target.auth_cache_size}, ttl {cfg.target.auth_cache_ttl} s, "
                           f"negative ttl {cfg.target.auth_cache_negative_ttl} s")  # fmt: skip
    finally:
        launcher.lab_down(lab_dir)
        if args.keep:
            print(f"lab directory kept: {lab_dir}", file=sys.stderr)
        else:
            shutil.rmtree(lab_dir, ignore_errors=True)
    return result


def report(r: dict[str, Any], argv: list[str]) -> str:
    c = r["cases"]
    lines = [
        f"Command: `.venv/bin/python bench/authcache_bench.py {' '.join(argv)}`",
        f"Machine: {platform.machine()}, nproc {os.cpu_count()}, Python {platform.python_version()}; load average "
        f"{r['load_before']} before the lab, {r['load_start']} at the start of the run, {r['load_end']} at the end",
        f"Pool: {r['users']} migrated accounts ({r['hash']}); {r['cache']}; measured run {r['run_s']:.1f} s; "
        f"logins the sidecar answered during the run: {r['sidecar_answers']}",
        "After the run, one account's hash replaced in the store without a flush; its old password still logs in "
        "(answered from the cache) on: "
        + (", ".join(k for k, v in r["stale_hash_accepted"].items() if v) or "none")
        + "; refused on: "
        + (", ".join(k for k, v in r["stale_hash_accepted"].items() if not v) or "none"),
        "",
        "| case | n | LOGIN p50 ms | LOGIN p95 ms | session p50 ms | session p95 ms |",
        "|---|---|---|---|---|---|",
    ]
    for case in CASES:
        lo, se = c[case]["login"], c[case]["session"]
        lines.append(f"| {case} | {lo['n']} | {lo['p50']:.1f} | {lo['p95']:.1f} | {se['p50']:.1f} | {se['p95']:.1f} |")
    lines += ["", "| ratio | LOGIN p50 | LOGIN p95 | session p50 | session p95 | goal |", "|---|---|---|---|---|---|"]
    for label, num, den, goal in (
        ("chain-cache / plain", "chain-cache", "plain", "<= 1.10"),
        ("chain-cache / chain-nocache", "chain-cache", "chain-nocache", "-"),
        ("plain-cache / plain", "plain-cache", "plain", "-"),
    ):
        vals = [float(c[num][w][q]) / float(c[den][w][q]) for w in ("login", "session") for q in ("p50", "p95")]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {goal} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logins", type=int, default=300, help="measured rounds (one login per case per round)")
    ap.add_argument("--warmup", type=int, default=20, help="rounds run first and not counted")
    ap.add_argument("--pool", type=int, default=10, help="migrated accounts the rounds log in as, in turn")
    ap.add_argument("--seed", type=int, default=1, help="seed of the per-round case order")
    ap.add_argument("--json", type=Path, help="also write every sample to this file")
    ap.add_argument("--keep", action="store_true", help="keep the lab directory (logs) afterwards")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (Dovecot instances, vmail ownership)", file=sys.stderr)
        return 2
    r = run(args)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    print(report(r, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
