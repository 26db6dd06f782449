"""Login latency benchmark (run by hand, not a test): pass-through and native logins against direct legacy logins.

    .venv/bin/python bench/login_bench.py [--logins 300] [--warmup 20] [--pool 40] [--seed 1] [--keep]

One lab (sidecar.lab.launcher, dovecot profile, SQLite store, empty mailboxes, copy_concurrency = 0 so no
account ever leaves `copying` by itself) plus a second target Dovecot whose passdb is the sql step only. Every
round runs each case once, in a shuffled order (seeded), so all cases see the same machine load; the first
--warmup rounds are not counted. Every login is a plain IMAP client session from the bench: TCP connect,
greeting, `LOGIN "user" "password"`, `LOGOUT`, close. Measured: the LOGIN command (sent -> tagged OK) and the
whole session (connect -> LOGOUT answered).

Cases:
  legacy            (a) LOGIN on the legacy Dovecot directly, plain IMAP, like a client (SHA512-CRYPT hashes).
  legacy-starttls   what the sidecar's verifier and Dovecot's proxy each do per login: the same LOGIN after
                    STARTTLS (certificate verified against the lab CA); a component, not a goal.
  verifier          the sidecar's own legacy check (sidecar.legacy.verify.LegacyVerifier.verify) called from the
                    bench process, as the sidecar runs it: on a connection kept ready (connected, STARTTLS
                    done; [legacy] ready_connections = 2), so ID, LOGIN, LOGOUT; a component, not a goal.
  verifier-cold     the same check with ready_connections = 0: connect, CAPABILITY, STARTTLS, ID, LOGIN, LOGOUT.
  first             (b) first login of a NEW unmigrated account on the target: sql -> sql deny -> checkpassword
                    shim -> sidecar (legacy IMAP check on a ready connection, store writes, job queued; the
                    argon2 hash is computed after the answer) -> Dovecot proxies the session to the legacy
                    server (STARTTLS + LOGIN there too).
  repeat            the next login of the account verified in the previous round (state copying): the
                    sidecar answers from its positive cache (no legacy check, no hashing); still proxied.
  migrated          (c) an account moved copying -> cutover -> migrated after its first login (its stored
                    {ARGON2ID} hash): the full chain on the target, answered by passdb step 1 (sql).
  sql-only          (d) the same accounts, the same store and hash, on a second target Dovecot rendered from
                    the same files with only the sql passdb (its own base_dir, state_dir, log and port).

The sidecar's own time per decision (its log's duration_ms, outcome ok / ok-cached) is reported too, and the
argon2 hash time of the configured [hash] parameters measured in this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import re
import shutil
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchlib import Conn, LoginFailed, loadavg, quote, summary  # noqa: E402

from sidecar import config as config_mod  # noqa: E402
from sidecar.auth import passwords  # noqa: E402
from sidecar.lab import launcher, proc  # noqa: E402
from sidecar.legacy.verify import LegacyVerifier  # noqa: E402
from sidecar.migration.cutover import flush_auth_cache  # noqa: E402
from sidecar.states import State  # noqa: E402
from sidecar.store import open_store  # noqa: E402

TIMEOUT = 30.0
CASES = ("legacy", "legacy-starttls", "verifier", "verifier-cold", "first", "repeat", "migrated", "sql-only")
SQL_ONLY = "bench-sqlonly-dovecot"


def imap_login(
    host: str, port: int, user: str, password: str, *, tls: ssl.SSLContext | None = None, server_name: str = ""
) -> tuple[float, float]:
    """One client session; (LOGIN ms, whole session ms). LoginFailed unless both LOGIN and LOGOUT say OK."""
    t0 = time.perf_counter()
    sock = socket.create_connection((host, port), TIMEOUT)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = Conn(sock)
        greeting = c.line()
        if not greeting.startswith(b"* OK"):
            raise LoginFailed(f"greeting {greeting!r}")
        if tls is not None:
            r = c.command("s", "STARTTLS")
            if not r.startswith(b"s OK"):
                raise LoginFailed(f"STARTTLS: {r!r}")
            c.sock = tls.wrap_socket(sock, server_hostname=server_name)
            c.buf = b""
        t1 = time.perf_counter()
        r = c.command("a", f"LOGIN {quote(user)} {quote(password)}")
        t2 = time.perf_counter()
        if not r.startswith(b"a OK"):
            raise LoginFailed(f"LOGIN {user}: {r.decode(errors='replace')}")
        r = c.command("b", "LOGOUT")
        if not r.startswith(b"b OK"):
            raise LoginFailed(f"LOGOUT {user}: {r!r}")
        t3 = time.perf_counter()
    finally:
        sock.close()
    return (t2 - t1) * 1000, (t3 - t0) * 1000


def timed_verify(verifier: LegacyVerifier, login: str, password: str) -> tuple[float, float]:
    t = time.perf_counter()
    verifier.verify(login, password, client_ip="127.0.0.1")
    ms = (time.perf_counter() - t) * 1000
    return ms, ms


def store_writes(lab_dir: Path, n: int = 50) -> list[float]:
    """What AuthPolicy._activate writes for a first login (hash precomputed), on a scratch SQLite store."""
    scratch = lab_dir / "scratch-store"
    scratch.mkdir()
    st = open_store(f"sqlite:///{scratch / 'bench.db'}")
    st.init()
    h = passwords.hash_password("correct horse battery", config_mod.HashConfig())
    out = []
    try:
        for i in range(n):
            address = f"scratch{i}@example.test"
            t = time.perf_counter()
            st.transition(address, State.COPYING, expect=None, reason="first login")
            st.set_password_hash(address, h)
            st.add_login(address, address)
            st.touch_login(address)
            st.enqueue(address, "copy")
            out.append((time.perf_counter() - t) * 1000)
    finally:
        st.close()
    return out


# --- the second target Dovecot: sql passdb only -----------------------------------------------------------------

_PASSDB = re.compile(r"^passdb \{\n.*?^\}\n", re.S | re.M)


def start_sql_only(info: dict[str, Any]) -> tuple[str, int]:
    """A copy of the target's rendered Dovecot config with only passdb step 1; started and recorded in the lab."""
    return start_copy(info, "sqlonly", sql_only=True)


def start_copy(info: dict[str, Any], name: str, *, sql_only: bool, cache_size: str | None = None) -> tuple[str, int]:
    """A copy of the target's rendered Dovecot config (DIR/NAME, its own base_dir, state_dir, log, auth and lmtp
    sockets and IMAP port), started and recorded in the lab. sql_only: passdb step 1 only; cache_size: its
    auth_cache_size instead of the rendered one ("0": no cache, plain Dovecot's default)."""
    lab = Path(info["dir"])
    src = Path(info["target"]["dovecot_config"]).parent
    root = lab / name
    dv = root / "dovecot"
    shutil.copytree(src, dv)
    for sub in ("run", "state", "private"):
        (root / sub).mkdir(mode=0o755)
    host = info["target"]["host"]
    port = proc.free_port(host)
    while port == info["target"]["imap"]:
        port = proc.free_port(host)
    log = lab / "logs" / f"{name}-dovecot.log"

    conf = (dv / "dovecot.conf").read_text()
    conf = re.sub(r"(?m)^base_dir = .*$", f"base_dir = {root / 'run'}", conf)
    conf = re.sub(r"(?m)^state_dir = .*$", f"state_dir = {root / 'state'}", conf)
    conf = re.sub(r"(?m)^instance_name = .*$", f"instance_name = autoport-bench-{name}", conf)
    (dv / "dovecot.conf").write_text(conf)

    auth = (dv / "conf.d" / "10-auth.conf").read_text()
    blocks = _PASSDB.findall(auth)
    if len(blocks) != 3 or "deny = yes" not in blocks[1] or "checkpassword" not in blocks[2]:
        raise SystemExit(f"unexpected passdb chain in {src}/conf.d/10-auth.conf: {len(blocks)} blocks")
    for b in blocks[1:] if sql_only else []:
        auth = auth.replace(b, "")
    if cache_size is not None:
        auth, n = re.subn(r"(?m)^auth_cache_size = .*$", f"auth_cache_size = {cache_size}", auth)
        if n != 1:
            raise SystemExit(f"no auth_cache_size line in {src}/conf.d/10-auth.conf")
    (dv / "conf.d" / "10-auth.conf").write_text(auth)

    master = (dv / "conf.d" / "10-master.conf").read_text()
    # the auth and lmtp sockets must not replace the real target's (in Postfix's queue directory)
    queue_private = re.search(r"unix_listener (\S+)/dovecot-lmtp", master)
    if not queue_private:
        raise SystemExit("no lmtp unix_listener in 10-master.conf")
    master = master.replace(queue_private.group(1) + "/", str(root / "private") + "/")
    master = master.replace(f"port = {info['target']['imap']}\n", f"port = {port}\n")
    for other in (info["target"]["pop3"], info["target"]["managesieve"]):
        master = master.replace(f"port = {other}\n", "port = 0\n")
    (dv / "conf.d" / "10-master.conf").write_text(master)
    (dv / "conf.d" / "10-logging.conf").write_text(f"log_path = {log}\n")

    pid = proc.spawn(["dovecot", "-F", "-c", str(dv / "dovecot.conf")], log.with_suffix(".out"))
    proc.record_pid(lab, SQL_ONLY if name == "sqlonly" else f"bench-{name}-dovecot", pid)  # lab_down stops it
    proc.wait_port(host, port, 15, what=f"{name} Dovecot", log=log)
    return host, port


# --- statistics -------------------------------------------------------------------------------------------


def sidecar_durations(log: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    pat = re.compile(r"auth (ok|ok-cached) account=\S+ .* duration_ms=(\d+)")
    for ln in log.read_text(errors="replace").splitlines():
        m = pat.search(ln)
        if m:
            out.setdefault(m.group(1), []).append(float(m.group(2)))
    return out


# --- the run ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds = args.warmup + args.logins
    n_users = args.pool + rounds
    lab_dir = Path(tempfile.mkdtemp(prefix="lb-", dir="/tmp"))
    os.chmod(lab_dir, 0o755)  # noqa: S103 - the mail daemons' users reach sockets inside
    result: dict[str, Any] = {"load_before": loadavg(), "users": n_users}
    try:
        t = time.monotonic()
        info = launcher.lab_up(
            lab_dir, users=n_users, messages_per_user=0, settings={"limits": {"copy_concurrency": 0}}
        )
        result["lab_up_s"] = time.monotonic() - t
        lg, tg = info["legacy"], info["target"]
        users = info["users"]
        pool, fresh = users[: args.pool], users[args.pool :]
        cfg = config_mod.load(info["config"])
        tls = ssl.create_default_context(cafile=lg["ca_file"])
        store = open_store(info["store"])
        verifier = LegacyVerifier(cfg.legacy)
        cold = LegacyVerifier(dataclasses.replace(cfg.legacy, ready_connections=0))

        # migrated pool: first login through pass-through (stores the hash), then copying -> cutover -> migrated
        for u in pool:
            imap_login(tg["host"], tg["imap"], u["login"], u["password"])
        for u in pool:
            deadline = time.monotonic() + 10  # the hash is stored right after the answer
            while (a := store.get(u["address"])) is not None and not a.has_password and time.monotonic() < deadline:
                time.sleep(0.05)
            acct = store.get(u["address"])
            if acct is None or acct.state is not State.COPYING or not acct.has_password:
                raise SystemExit(f"{u['address']}: not copying with a hash after its first login: {acct}")
            store.transition(u["address"], State.CUTOVER, expect=State.COPYING, reason="bench: copy done")
            store.transition(u["address"], State.MIGRATED, expect=State.CUTOVER, reason="bench: delta done")
        # as the runner does after the switch: Dovecot's auth cache still says "unknown user" for the sql steps
        flush_auth_cache(cfg, [n for u in pool for n in (u["login"], u["address"])])
        sq_host, sq_port = start_sql_only(info)

        def case(name: str, i: int) -> Callable[[], tuple[float, float]] | None:
            if name == "legacy":
                u = users[i % len(users)]
                return lambda: imap_login(lg["host"], lg["imap"], u["login"], u["password"])
            if name == "legacy-starttls":
                u = users[(i + 7) % len(users)]
                return lambda: imap_login(
                    lg["host"], lg["imap"], u["login"], u["password"], tls=tls, server_name=lg["tls_name"]
                )
            if name == "verifier":
                u = users[(i + 13) % len(users)]
                return lambda: timed_verify(verifier, u["login"], u["password"])
            if name == "verifier-cold":
                u = users[(i + 17) % len(users)]
                return lambda: timed_verify(cold, u["login"], u["password"])
            if name == "first":
                u = fresh[i]
                return lambda: imap_login(tg["host"], tg["imap"], u["login"], u["password"])
            if name == "repeat":
                if i == 0:
                    return None
                u = fresh[i - 1]
                return lambda: imap_login(tg["host"], tg["imap"], u["login"], u["password"])
            u = pool[i % len(pool)]
            if name == "migrated":
                return lambda: imap_login(tg["host"], tg["imap"], u["login"], u["password"])
            return lambda: imap_login(sq_host, sq_port, u["login"], u["password"])

        rng = random.Random(args.seed)
        samples: dict[str, dict[str, list[float]]] = {c: {"login": [], "session": []} for c in CASES}
        sidecar_log = Path(info["logs"]) / "sidecar.log"
        mark = sidecar_log.stat().st_size
        result["load_start"] = loadavg()
        t_run = time.monotonic()
        for i in range(rounds):
            if i == args.warmup:
                mark = sidecar_log.stat().st_size
            order = list(CASES)
            rng.shuffle(order)
            for name in order:
                fn = case(name, i)
                if fn is None:
                    continue
                login_ms, session_ms = fn()
                if i >= args.warmup:
                    samples[name]["login"].append(login_ms)
                    samples[name]["session"].append(session_ms)
        result["run_s"] = time.monotonic() - t_run
        result["load_end"] = loadavg()

        # the first logins really were first (legacy check) and the repeats answered from the cache
        tail = sidecar_log.read_bytes()[mark:].decode(errors="replace")
        tmp = lab_dir / "sidecar-run.log"
        tmp.write_text(tail)
        result["sidecar_ms"] = {k: summary(v) for k, v in sidecar_durations(tmp).items()}
        states = {store.state_of(u["address"]) for u in fresh}
        result["fresh_states"] = sorted(str(s) for s in states)
        store.close()

        # argon2 with the configured parameters, in this process (what the sidecar pays per first login, and
        # about what Dovecot pays per native login to verify)
        hashes = []
        for _ in range(20):
            t = time.perf_counter()
            passwords.hash_password("correct horse battery", cfg.hash)
            hashes.append((time.perf_counter() - t) * 1000)
        result["argon2_ms"] = summary(hashes)
        result["store_writes_ms"] = summary(store_writes(lab_dir))
        result["hash"] = {
            "scheme": cfg.hash.scheme,
            "m_kib": cfg.hash.argon2_memory_kib,
            "t": cfg.hash.argon2_time_cost,
            "p": cfg.hash.argon2_parallelism,
        }
        result["cases"] = {c: {k: summary(v) for k, v in samples[c].items()} for c in CASES}
        result["raw"] = samples
        verifier.close()
        cold.close()
    finally:
        launcher.lab_down(lab_dir)
        if args.keep:
            print(f"lab directory kept: {lab_dir}", file=sys.stderr)
        else:
            shutil.rmtree(lab_dir, ignore_errors=True)
    return result


def report(r: dict[str, Any], argv: list[str]) -> str:
    c = r["cases"]

    def p(case: str, what: str, q: str) -> float:
        return float(c[case][what][q])

    lines = [
        f"Command: `.venv/bin/python bench/login_bench.py {' '.join(argv)}`",
        f"Machine: {platform.machine()}, nproc {os.cpu_count()}, Python {platform.python_version()}; load average "
        f"{r['load_before']} before the lab, {r['load_start']} at the start of the run, {r['load_end']} at the end",
        f"Lab: {r['users']} users, up in {r['lab_up_s']:.1f} s; measured run {r['run_s']:.1f} s; "
        f"fresh accounts after the run: {', '.join(r['fresh_states'])}",
        "",
        "| case | n | LOGIN p50 ms | LOGIN p95 ms | session p50 ms | session p95 ms |",
        "|---|---|---|---|---|---|",
    ]
    for case in CASES:
        lo, se = c[case]["login"], c[case]["session"]
        lines.append(f"| {case} | {lo['n']} | {lo['p50']:.1f} | {lo['p95']:.1f} | {se['p50']:.1f} | {se['p95']:.1f} |")
    lines += ["", "| ratio | LOGIN p50 | LOGIN p95 | session p50 | session p95 | goal |", "|---|---|---|---|---|---|"]
    for label, num, den, goal in (
        ("first / legacy", "first", "legacy", "<= 2.00"),
        ("first / legacy-starttls", "first", "legacy-starttls", "-"),
        ("repeat / legacy", "repeat", "legacy", "-"),
        ("verifier / verifier-cold", "verifier", "verifier-cold", "-"),
        ("migrated / sql-only", "migrated", "sql-only", "<= 1.05"),
    ):
        vals = [p(num, w, q) / p(den, w, q) for w in ("login", "session") for q in ("p50", "p95")]
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {goal} |")
    lines.append("")
    for outcome, s in sorted(r["sidecar_ms"].items()):
        lines.append(f"Sidecar decision `{outcome}`: n {s['n']}, p50 {s['p50']:.0f} ms, p95 {s['p95']:.0f} ms")
    w = r["store_writes_ms"]
    lines.append(
        f"Store writes of a first login (transition, hash, login, touch, enqueue; the hash now after the answer) "
        f"on a scratch SQLite store: "
        f"p50 {w['p50']:.1f} ms, p95 {w['p95']:.1f} ms"
    )
    h, a = r["hash"], r["argon2_ms"]
    lines.append(
        f"argon2 ({h['scheme']} m={h['m_kib']} KiB t={h['t']} p={h['p']}) hash in the bench process: "
        f"p50 {a['p50']:.1f} ms, p95 {a['p95']:.1f} ms"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logins", type=int, default=300, help="measured rounds (one login per case per round)")
    ap.add_argument("--warmup", type=int, default=20, help="rounds run first and not counted")
    ap.add_argument("--pool", type=int, default=40, help="accounts migrated before the run, for cases c and d")
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
