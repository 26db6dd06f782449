"""How many accounts and GB one node moves per hour in bulk, with the legacy server protected.

    .venv/bin/python bench/node_bench.py [--users 40] [--messages 400] [--concurrency 4 8] [--rounds 1]
        [--baseline DIR]

For each `limits.copy_concurrency` value given, side by side in one run (rounds alternate the order): a fresh lab
with the same legacy mailboxes (same seed), then `autoport migrate --all --from FILE --wait` as an administrator
runs it (legacy admin credentials, the real daemon and job runner: initial copy, Sieve, cutover, final delta).
Measured: wall time until every account is migrated, the bytes copied (the messages' sizes on the target), the
peak number of connections toward the legacy server (all, and the sidecar's own against
`limits.legacy_connections`), and the CPU of the sidecar (with its children) and of the legacy Dovecot.
--baseline DIR also runs each case with the `sidecar` package of another checkout (PYTHONPATH=DIR for the lab's
sidecar and the `autoport` commands), in the same rounds: before and after side by side.

Needs root (Dovecot instances, vmail ownership). Results: results/node.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from benchlib import loadavg  # noqa: E402
from storm_bench import LegacyConnections, _procs, cpu_delta, cpu_snapshot  # noqa: E402

from sidecar import config as config_mod  # noqa: E402
from sidecar.lab import launcher, proc  # noqa: E402
from sidecar.states import State  # noqa: E402
from sidecar.store import open_store  # noqa: E402

_SIZE = re.compile(r",S=(\d+)")


def maildir_bytes(root: Path) -> tuple[int, int]:
    """(messages, bytes) of the Maildir files under root (the S= of their names)."""
    n = total = 0
    for dirpath, _dirs, files in os.walk(root):
        if not dirpath.endswith(("/cur", "/new")):
            continue
        for f in files:
            m = _SIZE.search(f)
            n += 1
            total += int(m.group(1)) if m else os.path.getsize(os.path.join(dirpath, f))
    return n, total


def sidecar_own(pid: int) -> float:
    """CPU seconds of the sidecar's own process and of the Python children it keeps (milter, socketmap workers):
    without the commands it ran and reaped (doveadm, postqueue, sendmail)."""
    procs = _procs()
    keep = [p for p, v in procs.items() if p == pid or (v["ppid"] == pid and "python" in v["cmd"])]
    # socketmap workers are the supervisor's children
    keep += [p for p, v in procs.items() if v["ppid"] in keep and p not in keep and "python" in v["cmd"]]
    return sum(procs[p]["own"] for p in keep)


def one(args: argparse.Namespace, concurrency: int, checkout: Path | None = None) -> dict[str, Any]:
    lab_dir = Path(tempfile.mkdtemp(prefix="nb-", dir="/tmp"))
    os.chmod(lab_dir, 0o755)  # noqa: S103 - the mail daemons' users reach sockets inside
    r: dict[str, Any] = {"copy_concurrency": concurrency, "version": str(checkout) if checkout else "this checkout"}
    saved = os.environ.get("PYTHONPATH")
    if checkout is not None:  # the lab's sidecar and the autoport commands inherit it
        os.environ["PYTHONPATH"] = str(checkout)
    try:
        settings = {"limits": {"copy_concurrency": concurrency}}
        if args.grace is not None:
            settings["limits"]["cutover_grace"] = args.grace
        info = launcher.lab_up(lab_dir, users=args.users, messages_per_user=args.messages, seed=args.seed,
                               settings=settings)  # fmt: skip
        cfg = config_mod.load(info["config"])
        r["legacy_connections_cap"] = cfg.limits.legacy_connections
        r["cutover_grace"] = cfg.limits.cutover_grace
        lg = dict(info["legacy"])
        ports = {k: int(lg[k]) for k in ("imap", "imaps", "pop3", "pop3s", "smtp", "submission", "sieve")
                 if lg.get(k)}  # fmt: skip
        pids = {k: v for k, v in proc.load_state(lab_dir)["pids"].items() if v}
        conns = LegacyConnections(lg["host"], ports, pids["sidecar"], period=0.1)
        users_file = lab_dir / "users.txt"
        users_file.write_text("".join(u["address"] + "\n" for u in info["users"]))
        time.sleep(2)
        r["load_start"] = loadavg()
        conns.start()
        cpu0 = cpu_snapshot(pids)
        own0 = sidecar_own(pids["sidecar"])
        t0 = time.monotonic()
        p = subprocess.run(
            [str(REPO / ".venv/bin/autoport"), "--config", str(info["config"]), "migrate", "--all",
             "--from", str(users_file), "--wait", "--timeout", str(args.timeout)],
            capture_output=True, text=True, timeout=args.timeout + 60, check=False,
        )  # fmt: skip
        wall = time.monotonic() - t0
        cpu1 = cpu_snapshot(pids)
        own1 = sidecar_own(pids["sidecar"])
        conns.stop()
        r["load_end"] = loadavg()
        store = open_store(info["store"])
        states = [store.state_of(u["address"]) for u in info["users"]]
        store.close()
        r["migrated"] = sum(1 for s in states if s is State.MIGRATED)
        r["exit"] = p.returncode
        if p.returncode != 0:
            r["output"] = (p.stdout + p.stderr)[-2000:]
        r["wall_s"] = wall
        mail_root = Path(cfg.target.mail_root)
        r["messages"], r["bytes"] = maildir_bytes(mail_root)
        peak, detail = conns.peak(t0, t0 + wall)
        r["legacy_peak_all"] = peak
        r["legacy_peak_sidecar"] = detail["per_port_peak"].get("sidecar", 0)
        d = cpu_delta(cpu0, cpu1)
        r["cpu_s"] = {k: round(d[k], 2) for k in ("sidecar", "legacy dovecot", "machine")}
        r["cpu_s"]["sidecar process"] = round(own1 - own0, 2)  # the rest of "sidecar": the commands it ran
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        launcher.lab_down(lab_dir)
        if args.keep:
            print(f"lab directory kept: {lab_dir}", file=sys.stderr)
        else:
            shutil.rmtree(lab_dir, ignore_errors=True)
    return r


def report(rows: list[dict[str, Any]], argv: list[str]) -> str:
    out = [
        f"    .venv/bin/python bench/node_bench.py {' '.join(argv)}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        "",
        "| version | round | copy_concurrency | migrated | wall s | accounts/h | GB/h | messages/s | "
        "legacy peak: all / sidecar's own (cap) | CPU s: sidecar (its commands) / legacy / machine | "
        "CPU s per GB: sidecar / legacy | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gb = r["bytes"] / 1e9
        h = r["wall_s"] / 3600
        c = r["cpu_s"]
        out.append(
            f"| {r['version']} | {r['round']} | {r['copy_concurrency']} | {r['migrated']} | {r['wall_s']:.1f} | "
            f"{r['migrated'] / h:.0f} | {gb / h:.2f} | {r['messages'] / r['wall_s']:.0f} | "
            f"{r['legacy_peak_all']} / {r['legacy_peak_sidecar']} ({r['legacy_connections_cap']}) | "
            f"{c['sidecar']:.1f} ({c['sidecar'] - c['sidecar process']:.1f}) / {c['legacy dovecot']:.1f} / "
            f"{c['machine']:.1f} | "
            f"{c['sidecar'] / gb:.1f} / {c['legacy dovecot'] / gb:.1f} | {r['load_start']} -> {r['load_end']} |"
        )
    total = rows[0]
    out += ["", f"{total['messages']} messages, {total['bytes'] / 1e6:.1f} MB (IMAP sizes) per run, "
            f"cutover_grace {total['cutover_grace']} s."]  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=40, help="legacy accounts, all migrated in bulk")
    ap.add_argument("--messages", type=int, default=400, help="messages per legacy mailbox")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[4, 8], help="limits.copy_concurrency values")
    ap.add_argument("--grace", type=float, help="limits.cutover_grace (default: the lab's)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800.0, help="give up waiting after SECONDS")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    ap.add_argument("--keep", action="store_true", help="keep the lab directories (logs) afterwards")
    ap.add_argument("--baseline", type=Path, help="another checkout's root, run side by side")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (Dovecot instances, vmail ownership)", file=sys.stderr)
        return 2
    rows = []
    for rnd in range(1, args.rounds + 1):
        cases = [(c, v) for c in args.concurrency for v in (None, args.baseline.resolve() if args.baseline else None)]
        cases = list(dict.fromkeys(cases))  # without a baseline: each concurrency once
        for c, checkout in cases if rnd % 2 else list(reversed(cases)):
            row = one(args, c, checkout)
            row["round"] = rnd
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(report(rows, argv))
    return 0 if all(r["migrated"] == args.users for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
