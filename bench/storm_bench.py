"""Morning storm benchmark (run by hand, not a test): many first logins at once, then the copies they start.

    .venv/bin/python bench/storm_bench.py [--users 200] [--concurrency 50] [--messages 2]
        [--migrate-timeout 900] [--cli-accounts 10000] [--cli-runs 3] [--baseline DIR] [--keep] [--json FILE]
        [--debian13]

One lab (sidecar.lab.launcher, dovecot profile, SQLite store, default settings, --messages small messages per
legacy mailbox). None of its --users accounts has ever logged in since the switch (none is in the store). The
bench logs every one of them in once on the target's IMAP port from --concurrency client threads at once: TCP
connect, greeting, `LOGIN`, `LOGOUT`. Each is a first login: sql -> sql deny -> checkpassword shim -> sidecar
(legacy check, store writes, copy queued, argon2 hash after the answer) -> Dovecot proxies the session to the
legacy server. With --debian13 the target's Postfix and Dovecot (2.4) run from the Debian 13 root
(sidecar.lab.debroot, built once per machine: `make debroot`), and the sidecar's answer comes through
Dovecot 2.4's Lua passdb inside the auth process: no checkpassword shim is started per login.

Measured:
- first-login LOGIN latency (LOGIN sent -> tagged answer) p50/p95/max, whole session p50/p95, failures by kind,
  logins/s (successful logins / wall time of the storm);
- the time from the storm's start until every account is `migrated` (the sidecar's copy jobs; --migrate-timeout);
- the peak number of TCP connections toward the legacy server, counted on the legacy side (ESTABLISHED sockets
  whose local end is a legacy listening port, /proc/net/tcp, sampled every 20 ms), in the storm and in the copy
  phase, against `limits.legacy_connections`;
- CPU by process, from /proc/PID/stat (utime+stime, and cutime+cstime of reaped children) of the lab's process
  trees, at the storm's start and end: legacy Dovecot (whole tree), target Dovecot auth (auth + auth-workers),
  the checkpassword shims (children of the auth process), target Dovecot other (master, imap-login proxies),
  sidecar, the bench's client threads, and everything else on the machine (/proc/stat minus the above);
- `autoport status` and `autoport report` wall time on a scratch SQLite store seeded through the store API with
  --cli-accounts accounts (0: skipped); --baseline DIR runs the same commands from another checkout's `sidecar`
  package too (PYTHONPATH=DIR), for a before/after ratio in one run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchlib import Conn, LoginFailed, loadavg, quote, summary  # noqa: E402

from sidecar import config as config_mod  # noqa: E402
from sidecar.lab import debroot, launcher, proc  # noqa: E402
from sidecar.states import State  # noqa: E402
from sidecar.store import open_store  # noqa: E402
from sidecar.store.base import MessageRecord  # noqa: E402

TIMEOUT = 60.0
TICK = os.sysconf("SC_CLK_TCK")


# --- the IMAP client --------------------------------------------------------------------------------------------


def _no_kind(answer: bytes) -> str:
    """`a NO [UNAVAILABLE] text` -> `LOGIN NO [UNAVAILABLE]`."""
    m = re.match(rb"\S+ (NO|BAD)( \[[A-Z-]+\])?", answer)
    return f"LOGIN {m.group(1).decode()}{(m.group(2) or b'').decode()}" if m else "LOGIN ?"


def imap_login(host: str, port: int, user: str, password: str) -> tuple[float, float]:
    """One client session; (LOGIN ms, session ms). LoginFailed(kind) unless LOGIN and LOGOUT say OK."""
    t0 = time.perf_counter()
    try:
        sock = socket.create_connection((host, port), TIMEOUT)
    except ConnectionRefusedError as e:
        raise LoginFailed("connect refused") from e
    except TimeoutError as e:
        raise LoginFailed("connect timeout") from e
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = Conn(sock)
        greeting = c.line()
        if not greeting.startswith(b"* OK"):
            raise LoginFailed("greeting", greeting.decode(errors="replace")[:120])
        t1 = time.perf_counter()
        r = c.command("a", f"LOGIN {quote(user)} {quote(password)}")
        t2 = time.perf_counter()
        if not r.startswith(b"a OK"):
            raise LoginFailed(_no_kind(r), r.decode(errors="replace")[:160])
        r = c.command("b", "LOGOUT")
        if not r.startswith(b"b OK"):
            raise LoginFailed("LOGOUT", r.decode(errors="replace")[:120])
        t3 = time.perf_counter()
    except TimeoutError as e:
        raise LoginFailed("timeout") from e
    except OSError as e:
        raise LoginFailed(type(e).__name__) from e
    finally:
        sock.close()
    return (t2 - t1) * 1000, (t3 - t0) * 1000


# --- /proc: connections toward the legacy server, CPU per process tree ----------------------------------------------


def _hexaddr(host: str, port: int) -> str:
    return f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"


class LegacyConnections:
    """Samples /proc/net/tcp every `period` s: ESTABLISHED sockets whose local end is a legacy listener."""

    def __init__(self, host: str, ports: dict[str, int], sidecar: int, period: float = 0.02) -> None:
        self.by_addr = {_hexaddr(host, p): name for name, p in ports.items() if p}
        self.sidecar = sidecar
        self.period = period
        self.samples: list[tuple[float, int, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="legacy-conns", daemon=True)

    def _sidecar_sockets(self) -> set[str]:
        out = set()
        fds = f"/proc/{self.sidecar}/fd"
        for fd in os.listdir(fds):
            try:
                link = os.readlink(f"{fds}/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(link[8:-1])
        return out

    def count(self) -> dict[str, int]:
        """ESTABLISHED connections per legacy port, and under "sidecar" those whose client end the sidecar
        holds (its verifier, copier and sweeps; the rest are Dovecot's proxied sessions and Postfix's relay)."""
        out: dict[str, int] = {}
        clients: set[str] = set()
        inode_of: dict[str, str] = {}
        with open("/proc/net/tcp") as f:
            next(f)
            for ln in f:
                parts = ln.split()
                if parts[3] != "01":
                    continue
                inode_of[parts[1]] = parts[9]
                name = self.by_addr.get(parts[1])
                if name:
                    out[name] = out.get(name, 0) + 1
                    clients.add(parts[2])
        if clients:
            mine = self._sidecar_sockets()
            out["sidecar"] = sum(1 for c in clients if inode_of.get(c) in mine)
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            c = self.count()
            self.samples.append((time.monotonic(), sum(v for k, v in c.items() if k != "sidecar"), c))
            self._stop.wait(self.period)

    def slow_down(self, period: float) -> None:
        """Sample less often (the copy phase lasts minutes; /proc/net/tcp lists the whole machine's sockets)."""
        self.period = period

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, end: float) -> tuple[int, dict[str, int]]:
        best, per = 0, {}
        port_peak: dict[str, int] = {}
        for t, total, c in self.samples:
            if start <= t <= end:
                if total > best:
                    best, per = total, c
                for k, v in c.items():
                    port_peak[k] = max(port_peak.get(k, 0), v)
        return best, {"at_peak": per, "per_port_peak": port_peak}  # type: ignore[dict-item]


def _procs() -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        # fields after comm: state ppid ... utime(14) stime(15) cutime(16) cstime(17), 1-based from pid
        out[int(d)] = {
            "ppid": int(rest[1]),
            "own": (int(rest[11]) + int(rest[12])) / TICK,
            "children": (int(rest[13]) + int(rest[14])) / TICK,
            "cmd": cmd,
        }
    return out


def _tree(procs: dict[int, dict[str, Any]], root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for pid, p in procs.items():
        kids.setdefault(p["ppid"], []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            out.append(pid)
            todo += kids.get(pid, [])
    return out


def _machine_cpu() -> float:
    """Busy CPU seconds of the whole machine (all CPUs) since boot."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far per part (trees counted with their reaped children)."""
    procs = _procs()
    snap: dict[str, float] = {"machine": _machine_cpu()}
    self_ru = resource.getrusage(resource.RUSAGE_SELF)
    snap["bench client"] = self_ru.ru_utime + self_ru.ru_stime
    snap["legacy dovecot"] = sum(procs[p]["own"] + procs[p]["children"] for p in _tree(procs, pids["legacy-dovecot"]))
    snap["sidecar"] = sum(procs[p]["own"] + procs[p]["children"] for p in _tree(procs, pids["sidecar"]))
    target = _tree(procs, pids["target-dovecot"])
    auth = shim = workers = 0.0
    for p in target:
        cmd = procs[p]["cmd"]
        argv = cmd.split()  # Dovecot's titles: INSTANCE/auth, and INSTANCE/auth -w for an auth worker
        title = argv[0] if argv else ""
        if title.endswith("/auth-worker") or (title.endswith("/auth") and "-w" in argv[1:]):
            workers += procs[p]["own"] + procs[p]["children"]
        elif title.endswith("/auth"):
            auth += procs[p]["own"]
            shim += procs[p]["children"]  # the checkpassword shims it forked and reaped
            shim += sum(procs[c]["own"] + procs[c]["children"] for c in _tree(procs, p) if c != p)
    total = sum(procs[p]["own"] + procs[p]["children"] for p in target)
    snap["target dovecot auth"] = auth
    snap["target auth-workers (sql)"] = workers
    snap["checkpassword shim"] = shim
    snap["target dovecot other"] = total - auth - shim - workers
    return snap


PARTS = (
    "legacy dovecot", "target dovecot auth", "target auth-workers (sql)", "checkpassword shim",
    "target dovecot other", "sidecar", "bench client",
)  # fmt: skip


def cpu_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    d = {k: b[k] - a[k] for k in a}
    d["everything else"] = d["machine"] - sum(d[k] for k in PARTS)
    return d


# --- statistics ---------------------------------------------------------------------------------------------


def sidecar_decisions(text: str) -> list[float]:
    pat = re.compile(r"auth ok account=\S+ .* duration_ms=(\d+)")
    return [float(m.group(1)) for m in pat.finditer(text)]


def sidecar_outcomes(text: str) -> dict[str, int]:
    """The sidecar's decisions by outcome (`auth OUTCOME account=...` lines): ok, busy, ..."""
    out: dict[str, int] = {}
    for m in re.finditer(r"INFO \S+: auth (.+?) account=\S+ ", text):
        out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


# --- the storm ----------------------------------------------------------------------------------------------


def storm(args: argparse.Namespace, lab_dir: Path, result: dict[str, Any], sysroot: Path | None) -> None:
    t = time.monotonic()
    info = launcher.lab_up(lab_dir, users=args.users, messages_per_user=args.messages, seed=args.seed, sysroot=sysroot)
    result["lab_up_s"] = time.monotonic() - t
    lg, tg = info["legacy"], info["target"]
    users = list(info["users"])
    random.Random(args.seed).shuffle(users)
    cfg = config_mod.load(info["config"])
    result["limits"] = {
        "legacy_connections": cfg.limits.legacy_connections,
        "auth_concurrency": cfg.limits.auth_concurrency,
        "copy_concurrency": cfg.limits.copy_concurrency,
        "ready_connections": cfg.legacy.ready_connections,
        "cutover_grace": cfg.limits.cutover_grace,
    }
    pids = {k: v for k, v in proc.load_state(lab_dir)["pids"].items() if v}
    store = open_store(info["store"])
    sidecar_log = Path(info["logs"]) / "sidecar.log"
    legacy: dict[str, Any] = dict(lg)
    ports = {
        k: int(legacy[k]) for k in ("imap", "imaps", "pop3", "pop3s", "smtp", "submission", "sieve") if legacy.get(k)
    }
    conns = LegacyConnections(legacy["host"], ports, pids["sidecar"])
    time.sleep(2)  # the sidecar's ready connections toward the legacy server are up
    result["legacy_connections_idle"] = conns.count()
    conns.start()
    mark = sidecar_log.stat().st_size
    result["load_start"] = loadavg()

    samples: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one(u: dict[str, str]) -> None:
        start = time.monotonic()
        rec: dict[str, Any] = {"address": u["address"], "start": start - t0}
        try:
            rec["login_ms"], rec["session_ms"] = imap_login(tg["host"], tg["imap"], u["login"], u["password"])
        except LoginFailed as e:
            rec["error"] = e.kind
            rec["detail"] = str(e)
        rec["end"] = time.monotonic() - t0
        with lock:
            samples.append(rec)

    cpu0 = cpu_snapshot(pids)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        list(pool.map(one, users))
    t1 = time.monotonic()
    cpu1 = cpu_snapshot(pids)
    result["load_storm_end"] = loadavg()
    ok = [s for s in samples if "error" not in s]
    failed = [s for s in samples if "error" in s]
    kinds: dict[str, int] = {}
    for s in failed:
        kinds[s["error"]] = kinds.get(s["error"], 0) + 1
    result["storm_s"] = t1 - t0
    result["logins"] = len(samples)
    result["ok"] = len(ok)
    result["failures"] = kinds
    result["failure_examples"] = sorted({s["detail"] for s in failed})[:5]
    result["logins_per_s"] = len(ok) / (t1 - t0)
    result["login_ms"] = summary([s["login_ms"] for s in ok])
    result["session_ms"] = summary([s["session_ms"] for s in ok])
    result["cpu_storm"] = cpu_delta(cpu0, cpu1)
    peak, detail = conns.peak(t0, t1)
    result["legacy_peak_storm"] = {"total": peak, **detail}

    # the copies the storm started: until every account is migrated (or the timeout)
    conns.slow_down(0.25)
    want = len(ok)  # a failed login made no account
    deadline = t0 + args.migrate_timeout
    migrated_at = float("nan")
    progress: list[tuple[float, int]] = []
    while time.monotonic() < deadline:
        states = store.summary()  # the lab's store holds these accounts only
        n = states[State.MIGRATED.value]
        progress.append((time.monotonic() - t0, n))
        if n >= want:
            migrated_at = time.monotonic() - t0
            break
        if not (states[State.COPYING.value] or states[State.CUTOVER.value]):
            break  # the copies are over, some accounts did not make it (failed): no "all migrated" time
        time.sleep(0.5)
    t2 = time.monotonic()
    cpu2 = cpu_snapshot(pids)
    conns.stop()
    result["load_end"] = loadavg()
    result["all_migrated_s"] = migrated_at
    result["migrated"] = progress[-1][1] if progress else 0
    result["migration_progress"] = progress[:: max(1, len(progress) // 40)]
    result["states_end"] = store.summary()
    peak2, detail2 = conns.peak(t1, t2)
    result["legacy_peak_copy"] = {"total": peak2, **detail2}
    result["cpu_copy"] = cpu_delta(cpu1, cpu2)
    store.close()
    tail = sidecar_log.read_bytes()[mark:].decode(errors="replace")
    result["sidecar_decision_ms"] = summary(sidecar_decisions(tail))
    result["sidecar_outcomes"] = sidecar_outcomes(tail)
    result["raw"] = sorted(samples, key=lambda s: s["start"])

    if args.cli_accounts:
        result["cli"] = cli_bench(args, lab_dir, Path(info["config"]))


# --- status / report with many accounts ---------------------------------------------------------------------------


def seed_store(url: str, n: int, seed: int) -> dict[str, int]:
    """n accounts in a mix of states, their logins, an inventory listing them and 5% more, message-log rows."""
    rng = random.Random(seed)
    st = open_store(url)
    st.init()
    domain = "example.test"
    paths = {
        "migrated": (State.COPYING, State.CUTOVER, State.MIGRATED),
        "copying": (State.COPYING,),
        "cutover": (State.COPYING, State.CUTOVER),
        "failed": (State.COPYING, State.FAILED),
        "discovered": (State.DISCOVERED,),
    }
    mix = ["migrated"] * 70 + ["copying"] * 12 + ["cutover"] * 3 + ["failed"] * 3 + ["discovered"] * 12
    counts: dict[str, int] = {}
    addresses = []
    try:
        for i in range(n):
            address = f"user{i:05d}@{domain}"
            addresses.append(address)
            kind = rng.choice(mix)
            counts[kind] = counts.get(kind, 0) + 1
            for s in paths[kind]:
                st.transition(address, s, reason="seed")
            if kind != "discovered":
                st.add_login(address, f"user{i:05d}")
                st.touch_login(address)
            if kind == "failed":
                st.set_error(address, "IMAP error on the legacy server: seeded")
        listed = addresses + [f"gone{i:05d}@{domain}" for i in range(n // 20)]
        st.set_inventory("file:seed", "account", listed)
        for i in range(0, n // 20, 2):
            st.set_exclusion(f"gone{i:05d}@{domain}", "seeded: left behind")
        for i in range(50):
            st.set_alias(f"team{i}@{domain}", [addresses[(i * 7) % n]])
        now = time.time()
        recs = []
        for i in range(n * 2):
            rcpt = addresses[rng.randrange(n)] if i % 10 else f"role{i % 40}@{domain}"
            route = "lmtp" if i % 3 else "smtp:[legacy]:25"
            recs.append(MessageRecord(f"Q{i}", rcpt, f"someone{i % 97}@elsewhere.test", f"<{i}@x>", route,
                                      2000 + i % 5000, at=now - rng.random() * 14 * 86400))  # fmt: skip
        st.log_messages(recs)
        counts["message_log"] = len(recs)
        counts["inventory"] = len(listed)
    finally:
        st.close()
    return counts


def _timed(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, float, int]:
    """(wall ms, CPU ms of the command: user + sys, from wait4 via RUSAGE_CHILDREN, output bytes)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, check=False)
    ms = (time.perf_counter() - t) * 1000
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) * 1000
    if p.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.decode(errors='replace')[-500:]}")
    return ms, cpu, len(p.stdout)


def cli_bench(args: argparse.Namespace, lab_dir: Path, lab_config: Path) -> dict[str, Any]:
    db = lab_dir / "cli-store" / "cli.db"
    db.parent.mkdir()
    url = f"sqlite:///{db}"
    t = time.monotonic()
    counts = seed_store(url, args.cli_accounts, args.seed)
    seed_s = time.monotonic() - t
    conf = lab_dir / "cli-store" / "autoport.toml"
    text = lab_config.read_text()
    text, n = re.subn(r'(?m)^url = ".*"$', f'url = "{url}"', text, count=1)
    if n != 1:
        raise SystemExit(f"no store url line in {lab_config}")
    conf.write_text(text)
    exe = str(Path(sys.executable).parent / "autoport")
    commands = {
        "status": ["status"],
        "status --json": ["status", "--json"],
        "report": ["report"],
        "report --format json": ["report", "--format", "json"],
        "report --section never_seen": ["report", "--section", "never_seen"],
    }
    # byte-compiled modules, as an installed package has them (this environment may set PYTHONDONTWRITEBYTECODE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["COLUMNS"] = "160"
    versions: dict[str, dict[str, list[str]]] = {"this": {}}
    if args.baseline:
        versions["baseline"] = {}
    out: dict[str, Any] = {
        "accounts": args.cli_accounts,
        "seeded": counts,
        "seed_s": seed_s,
        "ms": {},
        "cpu_ms": {},
        "bytes": {},
        "load_start": loadavg(),
    }
    for run in range(args.cli_runs + 1):  # run 0 writes the byte code and warms the page cache: not counted
        for version in versions:
            for label, argv in commands.items():
                cwd = None
                if version == "this":
                    cmd = [exe, "--config", str(conf), *argv]
                    e = env
                else:
                    # `python -c` puts the working directory first on sys.path: run it in the baseline's
                    cwd = args.baseline
                    code = "import sys; from sidecar.ops.cli import main; sys.exit(main())"
                    cmd = [sys.executable, "-c", code, "--config", str(conf), *argv]
                    e = dict(env, PYTHONPATH=str(args.baseline))
                ms, cpu, size = _timed(cmd, e, cwd)
                if run:
                    out["ms"].setdefault(version, {}).setdefault(label, []).append(ms)
                    out["cpu_ms"].setdefault(version, {}).setdefault(label, []).append(cpu)
                out["bytes"].setdefault(version, {})[label] = size
    out["load_end"] = loadavg()
    return out


# --- the report ---------------------------------------------------------------------------------------------


def report(r: dict[str, Any], argv: list[str]) -> str:
    lines = [
        f"Command: `.venv/bin/python bench/storm_bench.py {' '.join(argv)}`",
        f"Machine: {platform.machine()}, nproc {os.cpu_count()}, Python {platform.python_version()}; load average "
        f"{r['load_before']} before the lab, {r['load_start']} at the storm's start, {r['load_storm_end']} at its "
        f"end, {r['load_end']} at the end of the copy phase",
        f"Lab: {r['users']} users, --messages {r['messages']}, target stack on the {r['target']}, "
        f"up in {r['lab_up_s']:.1f} s; limits {r['limits']}",
        "",
        f"Storm: {r['logins']} first logins at concurrency {r['concurrency']} in {r['storm_s']:.1f} s: "
        f"**{r['logins_per_s']:.1f} logins/s**, {r['ok']} ok, failures: {r['failures'] or 0}",
    ]
    lines.append(f"The sidecar's decisions by outcome (its log): {r.get('sidecar_outcomes')}")
    if r["failure_examples"]:
        lines.append(f"Failure examples: {r['failure_examples']}")
    lo, se, sd = r["login_ms"], r["session_ms"], r["sidecar_decision_ms"]
    done = r["all_migrated_s"]
    migrated = (
        f"{done:.1f} s"
        if not math.isnan(done)
        else f"not within {r['migrate_timeout']:.0f} s ({r['migrated']} migrated; states {r['states_end']})"
    )
    lines += [
        "",
        "| measure | n | p50 ms | p95 ms | max ms |",
        "|---|---|---|---|---|",
        f"| first LOGIN | {lo['n']} | {lo['p50']:.0f} | {lo['p95']:.0f} | {lo['max']:.0f} |",
        f"| first session | {se['n']} | {se['p50']:.0f} | {se['p95']:.0f} | {se['max']:.0f} |",
        f"| sidecar decision (log duration_ms) | {sd['n']} | {sd['p50']:.0f} | {sd['p95']:.0f} | {sd['max']:.0f} |",
        "",
        f"All {r['ok']} accounts of the successful logins migrated after: {migrated} from the storm's start "
        f"({r['migrated']} migrated; states at the end {r['states_end']})",
        f"Legacy connections (legacy side, ESTABLISHED): idle before {r['legacy_connections_idle']}; peak in the storm "
        f"{r['legacy_peak_storm']['total']} (peak per port, and of the sidecar's own: "
        f"{r['legacy_peak_storm']['per_port_peak']}); peak in the copy "
        f"phase {r['legacy_peak_copy']['total']} (per port {r['legacy_peak_copy']['per_port_peak']}); "
        f"limits.legacy_connections = {r['limits']['legacy_connections']}",
        "",
        "| CPU s (share of busy) | storm | per login ms | copy phase |",
        "|---|---|---|---|",
    ]
    cs, cc = r["cpu_storm"], r["cpu_copy"]
    n = max(1, r["ok"])
    for part in (*PARTS, "everything else", "machine"):
        lines.append(
            f"| {part} | {cs[part]:.2f} ({cs[part] / cs['machine'] * 100:.0f}%) | {cs[part] / n * 1000:.1f} "
            f"| {cc[part]:.2f} |"
        )
    lines.append(f"| machine capacity (nproc x wall) | {(os.cpu_count() or 1) * r['storm_s']:.2f} | | |")
    if "cli" in r:
        lines += report_cli(r, [])

    return "\n".join(lines)


def report_cli(r: dict[str, Any], argv: list[str]) -> Any:
    """The status/report table (a string with argv: --cli-only; else lines for report())."""
    lines: list[str] = []
    if argv:
        lines += [
            f"Command: `.venv/bin/python bench/storm_bench.py {' '.join(argv)}`",
            f"Machine: {platform.machine()}, nproc {os.cpu_count()}, Python {platform.python_version()}",
        ]
    if "cli" in r:
        c = r["cli"]
        base = "baseline" in c["ms"]
        lines += [
            "",
            f"CLI with {c['accounts']} accounts (seeded in {c['seed_s']:.0f} s: {c['seeded']}); load "
            f"{c['load_start']} -> {c['load_end']}; {len(next(iter(c['ms']['this'].values())))} runs each "
            "after one warm-up, ms min / median / max:",
            "",
            "| command | wall | CPU | " + ("baseline wall | baseline CPU | wall ratio | CPU ratio |" if base else ""),
            "|---|---|---|" + ("---|---|---|---|" if base else ""),
        ]

        def mmm(v: list[float]) -> str:
            return f"{min(v):.0f} / {statistics.median(v):.0f} / {max(v):.0f}"

        for label, ms in c["ms"]["this"].items():
            cpu = c["cpu_ms"]["this"][label]
            row = f"| `{label}` | {mmm(ms)} | {mmm(cpu)} |"
            if base:
                bw, bc = c["ms"]["baseline"][label], c["cpu_ms"]["baseline"][label]
                row += f" {mmm(bw)} | {mmm(bc)} | {statistics.median(ms) / statistics.median(bw):.2f} |"
                row += f" {statistics.median(cpu) / statistics.median(bc):.2f} |"
            lines.append(row)
    return "\n".join(lines) if argv else lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=200, help="accounts that log in for the first time")
    ap.add_argument("--concurrency", type=int, default=50, help="client sessions at once")
    ap.add_argument("--messages", type=int, default=2, help="messages per legacy mailbox")
    ap.add_argument("--migrate-timeout", type=float, default=900.0, help="wait at most this long for the copies")
    ap.add_argument("--cli-accounts", type=int, default=10000, help="accounts in the status/report store (0: skip)")
    ap.add_argument("--cli-runs", type=int, default=3, help="runs of each status/report command")
    ap.add_argument("--baseline", type=Path, help="a checkout whose `sidecar` also runs the status/report commands")
    ap.add_argument("--cli-only", action="store_true", help="only the status/report part (no lab, no storm)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write every sample to this file")
    ap.add_argument("--keep", action="store_true", help="keep the lab directory (logs) afterwards")
    ap.add_argument(
        "--debian13", action="store_true", help="the target's Postfix and Dovecot 2.4 from the Debian 13 root"
    )
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (Dovecot instances, vmail ownership)", file=sys.stderr)
        return 2
    sysroot = None
    if args.debian13:
        try:
            sysroot = debroot.ensure()
        except (debroot.DebrootError, OSError) as e:
            print(
                f"--debian13 needs the Debian 13 root at {debroot.DEFAULT_ROOT} (`make debroot`): {e}", file=sys.stderr
            )
            return 2
        lab_dir = debroot.new_lab_dir(sysroot, "sb-")
    else:
        lab_dir = Path(tempfile.mkdtemp(prefix="sb-", dir="/tmp"))
        os.chmod(lab_dir, 0o755)  # noqa: S103 - the mail daemons' users reach sockets inside
    result: dict[str, Any] = {
        "load_before": loadavg(),
        "users": args.users,
        "concurrency": args.concurrency,
        "messages": args.messages,
        "migrate_timeout": args.migrate_timeout,
        "target": "Debian 13 root" if sysroot else "host",
    }
    try:
        if args.cli_only:
            cfg = lab_dir / "autoport.toml"
            cfg.write_text('[store]\nurl = "sqlite:///unused"\n[mail]\ndomains = ["example.test"]\n'
                           '[legacy]\nhost = "127.0.0.1"\n')  # fmt: skip
            result["cli"] = cli_bench(args, lab_dir, cfg)
        else:
            storm(args, lab_dir, result, sysroot)
    finally:
        launcher.lab_down(lab_dir)
        if args.keep:
            print(f"lab directory kept: {lab_dir}", file=sys.stderr)
        else:
            shutil.rmtree(lab_dir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(report_cli(result, argv) if args.cli_only else report(result, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
