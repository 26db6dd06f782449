"""The conservation test: nothing lost, nothing twice, across logins, migrations and faults.

2,000 messages with unique Message-IDs go to 50 users through the target's Postfix while users log in and
migrate: 15 migrated before the run, 20 migrating during it, 15 never. Some messages have several recipients in
different states. During the run the sidecar is SIGKILLed and restarted, the legacy server's Dovecot restarted
(cutting the copier's and its Postfix's connections), the PostgreSQL store stopped for a few seconds, and the
target's Postfix reloaded. A sender behaves like an MTA: a 4xx is retried, a 5xx would be a bounce (and fails
the test: every recipient exists).

Once queues drain and migrations settle, each accepted (message, recipient) must be in the mailbox the
recipient reads (the target for migrated accounts, the legacy server for the others) exactly once. The test
prints a table (sent, delivered, lost, duplicated, per fault) and fails on any loss or duplicate.
"""

from __future__ import annotations

import contextlib
import imaplib
import random
import re
import smtplib
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness.waiting import wait_for

from sidecar import config
from sidecar.lab import launcher, pgcluster, proc
from sidecar.states import State
from sidecar.store import open_store
from sidecar.store.base import Store, StoreUnavailable

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

USERS = 50
MESSAGES = 2000
SENDERS = 4
BEFORE = range(0, 15)
DURING = range(15, 35)
# the rest never log in
SEED = 20261126


@dataclass
class Ledger:
    """What the senders got accepted, and when, per (Message-ID, recipient)."""

    accepted: dict[tuple[str, str], float] = field(default_factory=dict)
    rejected: list[tuple[str, str, int, str]] = field(default_factory=list)
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Fault:
    name: str
    start: float = 0.0
    end: float = 0.0


LAB = {
    "prefix": "ap-cons-", "users": USERS, "store": "postgresql", "messages_per_user": 3,
    "settings": {"limits": {"cutover_grace": 1.0, "lease_seconds": 5.0, "sweep_interval": 2.0, "copy_concurrency": 4}},
}  # fmt: skip


def imap_login(host: str, port: int, user: dict[str, Any]) -> None:
    for _ in range(30):
        try:
            with imaplib.IMAP4(host, port, timeout=60) as c:
                c.login(user["login"], user["password"])
                return
        except (imaplib.IMAP4.error, OSError):
            time.sleep(1)  # a temporary failure during a fault: the client tries again
    raise AssertionError(f"{user['address']} could not log in")


def wait_settled(store: Store, timeout: float = 420) -> dict[str, State]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            states = {a.address: a.state for a in store.accounts()}
        except StoreUnavailable:  # our own connection did not survive the store restart: the next one will
            time.sleep(0.5)
            continue
        moving = [a for a, s in states.items() if s in (State.COPYING, State.CUTOVER)]
        if not moving or time.monotonic() > deadline:
            assert not moving, f"accounts still moving: {moving}"
            return states
        time.sleep(0.25)


def queue_empty(postfix_dir: str) -> bool:
    out = subprocess.run(["postqueue", "-c", postfix_dir, "-p"], capture_output=True, text=True, check=False)
    return "Mail queue is empty" in out.stdout


def drain(postfix_dirs: list[str], timeout: float = 240) -> None:
    """Flush the queues (again every 3 s while mail waits) until all are empty, looked at every 0.25 s. The
    target's queue is looked at first: mail it hands to the legacy server is in the legacy queue by then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in postfix_dirs:
            subprocess.run(["postqueue", "-c", d, "-f"], capture_output=True, check=False)
        flushed = time.monotonic()
        while time.monotonic() - flushed < 3:
            if all(queue_empty(d) for d in postfix_dirs):
                return
            time.sleep(0.25)
    raise AssertionError("queues did not drain: " + "; ".join(
        subprocess.run(["postqueue", "-c", d, "-p"], capture_output=True, text=True, check=False).stdout[-1500:]
        for d in postfix_dirs
    ))


def wait_sweeps(store: Store, addresses: list[str], timeout: float = 120) -> None:
    """Until each account's trailing sweep has run once entirely after now. A sweep that ends sets its job's next
    run to (end + sweep_interval), later than any before: the first such rise after now may come from a sweep that
    read the legacy mailbox before now, the second from a sweep leased after the first one ended."""
    latest: dict[str, float] = {}  # the latest next-run time seen per account
    rises: Counter[str] = Counter()

    def swept() -> bool:
        try:
            jobs = [j for j in store.jobs() if j.kind == "sweep" and j.address in addresses]
        except StoreUnavailable:
            return False
        for j in jobs:
            if j.address not in latest:
                latest[j.address] = j.not_before
            elif j.not_before > latest[j.address]:  # a sweep ended (a wake-up sets 0: not a rise)
                latest[j.address] = j.not_before
                rises[j.address] += 1
        return all(rises[a] >= 2 for a in addresses)

    wait_for(swept, timeout, lambda: f"a whole sweep of {[a for a in addresses if rises[a] < 2][:5]}", interval=0.2)


MSGID = re.compile(rb"<cons-\d+@conservation\.test>")


def message_ids(host: str, port: int, user: dict[str, Any]) -> Counter[str]:
    found: Counter[str] = Counter()
    with imaplib.IMAP4(host, port, timeout=60) as c:
        c.login(user["login"], user["password"])
        _typ, data = c.select("INBOX", readonly=True)
        if int(data[0] or 0) == 0:
            return found
        _typ, items = c.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        for item in items:
            if isinstance(item, tuple):
                for m in MSGID.findall(item[1]):
                    found[m.decode()] += 1
    return found


def send_all(tg: dict[str, Any], users: list[dict[str, Any]], ledger: Ledger, stop: threading.Event) -> None:
    rnd = random.Random(SEED)
    plan: list[tuple[str, list[str]]] = []
    for n in range(MESSAGES):
        k = rnd.choices([1, 2, 3], weights=[80, 15, 5])[0]
        rcpts = sorted({u["address"] for u in rnd.sample(users, k)})
        plan.append((f"<cons-{n}@conservation.test>", rcpts))
    chunks = [plan[i::SENDERS] for i in range(SENDERS)]

    def sender(chunk: list[tuple[str, list[str]]]) -> None:
        for msgid, rcpts in chunk:
            pending = list(rcpts)
            for _attempt in range(120):
                if not pending:
                    break
                pending = send_one(tg, msgid, pending, ledger)
                if pending:
                    with ledger.lock:
                        ledger.retries += 1
                    time.sleep(1)
            assert not pending, f"{msgid} never accepted for {pending}"

    threads = [threading.Thread(target=sender, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()


def send_one(tg: dict[str, Any], msgid: str, rcpts: list[str], ledger: Ledger) -> list[str]:
    """One SMTP transaction; returns the recipients to retry (4xx or connection trouble)."""
    body = (
        f"From: sender@outside.test\r\nTo: {', '.join(rcpts)}\r\nMessage-ID: {msgid}\r\n"
        f"Subject: conservation\r\n\r\n{msgid}\r\n"
    ).encode()
    try:
        with smtplib.SMTP(tg["host"], tg["smtp"], timeout=60) as s:
            s.ehlo("sender.outside.test")
            code, msg = s.mail("sender@outside.test")
            if code >= 400:
                return rcpts
            ok, retry = [], []
            for r in rcpts:
                code, msg = s.rcpt(r)
                if code < 300:
                    ok.append(r)
                elif code < 500:
                    retry.append(r)
                else:
                    with ledger.lock:
                        ledger.rejected.append((msgid, r, code, msg.decode(errors="replace")))
            if not ok:
                s.rset()
                return retry
            code, msg = s.data(body)
            if code >= 400:
                return rcpts if code < 500 else retry
            now = time.time()
            with ledger.lock:
                for r in ok:
                    ledger.accepted[(msgid, r)] = now
            return retry
    except (smtplib.SMTPException, OSError):
        # accepted-or-not unknown only after DATA was sent; smtplib raises before that here: retry all
        return [r for r in rcpts if (msgid, r) not in ledger.accepted]


def inject_faults(lab: dict[str, Any], faults: list[Fault], stop: threading.Event) -> None:
    lab_dir = Path(lab["dir"])
    state = proc.load_state(lab_dir)
    pg = pgcluster.PgCluster(Path(state["pg"]["dir"]))
    steps = [
        ("sidecar SIGKILL + restart", lambda: (
            kill_sidecar_hard(lab_dir),
            time.sleep(1),
            launcher.lab_restart(lab_dir, "sidecar"),
        )),
        ("legacy connections cut", lambda: launcher.lab_restart(lab_dir, "legacy-dovecot")),
        ("store down 3 s", lambda: (pg.stop(), time.sleep(3), pg.start())),
        ("postfix reload", lambda: subprocess.run(
            ["postfix", "-c", lab["target"]["postfix_config"], "reload"], capture_output=True, check=True)),
    ]
    for name, action in steps:
        if stop.wait(4):
            break
        f = Fault(name, start=time.time())
        action()
        f.end = time.time()
        faults.append(f)


def kill_sidecar_hard(lab_dir: Path) -> None:
    import os
    import signal

    pid = int(proc.load_state(lab_dir)["pids"]["sidecar"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(900)  # on a loaded 2-core machine 50 cutover handshakes can take minutes
def test_nothing_lost_nothing_twice(lab: dict[str, Any]) -> None:
    lab_dir = Path(lab["dir"])
    users: list[dict[str, Any]] = lab["users"]
    tg, lg = lab["target"], lab["legacy"]
    store = open_store(config.load(lab["config"]).store.url)
    try:
        # 1. some users migrated before the run
        for i in BEFORE:
            imap_login(tg["host"], tg["imap"], users[i])
        settled = wait_settled(store)
        assert all(settled[users[i]["address"]] is State.MIGRATED for i in BEFORE)

        # 2. send while others log in and faults happen
        ledger, faults, stop = Ledger(), [], threading.Event()
        sender = threading.Thread(target=send_all, args=(tg, users, ledger, stop))

        def logins() -> None:
            for i in DURING:
                time.sleep(0.4)
                imap_login(tg["host"], tg["imap"], users[i])

        login_thread = threading.Thread(target=logins)
        fault_thread = threading.Thread(target=inject_faults, args=(lab, faults, stop))
        started = time.time()
        sender.start()
        login_thread.start()
        fault_thread.start()
        sender.join(900)
        login_thread.join(300)
        fault_thread.join(300)
        assert not sender.is_alive()
        send_seconds = time.time() - started

        # 3. settle: migrations finish, queues drain, trailing sweeps run
        states = wait_settled(store)
        drain([tg["postfix_config"], str(lab_dir / "legacy" / "postfix")])
        # mail that reached a migrated user's legacy mailbox late is appended by the next trailing sweep
        wait_sweeps(store, [a for a, s in states.items() if s is State.MIGRATED])
        drain([tg["postfix_config"], str(lab_dir / "legacy" / "postfix")])
        states = wait_settled(store)

        # 4. count what each user reads
        seen: dict[str, Counter[str]] = {}
        for u in users:
            local = states.get(u["address"]) is State.MIGRATED
            host, port = (tg["host"], tg["imap"]) if local else (lg["host"], lg["imap"])
            seen[u["address"]] = message_ids(host, port, u)
    finally:
        store.close()

    lost = [k for k in ledger.accepted if seen[k[1]][k[0]] == 0]
    dup = [k for k in ledger.accepted if seen[k[1]][k[0]] > 1]
    unexpected = [
        (mid, rcpt) for rcpt, c in seen.items() for mid in c if (mid, rcpt) not in ledger.accepted
    ]

    def bucket(t: float) -> str:
        for f in faults:
            if f.start - 1 <= t <= f.end + 3:
                return f.name
        return "no fault"

    rows: dict[str, Counter[str]] = {}
    for k, t in ledger.accepted.items():
        b = rows.setdefault(bucket(t), Counter())
        b["sent"] += 1
        n = seen[k[1]][k[0]]
        b["delivered"] += n >= 1
        b["lost"] += n == 0
        b["duplicated"] += n > 1
    migrated = sum(1 for s in states.values() if s is State.MIGRATED)
    print(f"\nconservation: {MESSAGES} messages, {len(ledger.accepted)} (message, recipient) pairs accepted in "
          f"{send_seconds:.0f} s, {ledger.retries} sender retries, {migrated} accounts migrated")
    print(f"{'fault':<28}{'sent':>8}{'delivered':>11}{'lost':>7}{'duplicated':>12}")
    for name in [f.name for f in faults] + ["no fault"]:
        c = rows.get(name, Counter())
        print(f"{name:<28}{c['sent']:>8}{c['delivered']:>11}{c['lost']:>7}{c['duplicated']:>12}")
    total = sum(rows.values(), Counter())
    print(f"{'total':<28}{total['sent']:>8}{total['delivered']:>11}{total['lost']:>7}{total['duplicated']:>12}")

    assert ledger.rejected == [], f"permanent rejections of existing users: {ledger.rejected[:5]}"
    assert len(faults) == 4, f"not every fault ran: {[f.name for f in faults]}"
    assert sum(1 for i in DURING if states[users[i]["address"]] is State.MIGRATED) == len(DURING)
    assert not lost, f"{len(lost)} lost, e.g. {lost[:5]}"
    assert not dup, f"{len(dup)} duplicated, e.g. {dup[:5]}"
    assert not unexpected, f"{len(unexpected)} delivered but never accepted, e.g. {unexpected[:5]}"
