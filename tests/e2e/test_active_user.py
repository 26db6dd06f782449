"""A user who keeps working through the whole move, on real servers, with the legacy side slowed down.

A throttling relay (tests/harness/throttle.py) sits between the target and the legacy server's IMAP and POP3
ports, so the initial copy and the cutover last seconds. Meanwhile:

- an IMAP client (the user) works at the target in rounds, in every phase (copying, cutover, migrated): sets and
  clears flags and keywords, appends to Sent with a date and flags, expunges, moves messages between folders,
  creates, renames, subscribes and unsubscribes folders; a POP3 client RETRs and DELEs;
- mail arrives through the target's Postfix all along.

A change counts once the server answered OK. A session that is closed under the client (the cutover kicks it)
or a login answered "temporary failure" (cutover in progress) is retried like a client would, with the
change looked up first (each step is written to be idempotent). Afterwards the target mailbox must equal the
legacy mailbox as it was before the move plus every confirmed change and every accepted message, each message
exactly once, and no message may have reached the legacy mailbox after the final delta (no sweep hit).
"""

from __future__ import annotations

import contextlib
import email.utils
import imaplib
import poplib
import re
import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness.labs import running_lab
from harness.throttle import Relay
from harness.waiting import wait_for

from sidecar import config
from sidecar.states import State
from sidecar.store import open_store
from sidecar.store.base import Store

pytestmark = pytest.mark.e2e

RATE = 300_000  # bytes per second from the legacy server, per connection
Model = dict[str, dict[str, set[str]]]  # folder -> Message-ID -> flags
_MID = re.compile(rb"message-id:\s*(<[^>\r\n]*>)", re.IGNORECASE)
AUTO_SUBSCRIBED = {"Sent", "Drafts", "Trash", "Junk"}  # the target's Dovecot subscribes these itself


@pytest.fixture(scope="module")
def lab() -> Iterator[dict[str, Any]]:
    with Relay("127.0.0.2", rate=RATE) as imap_relay, Relay("127.0.0.2", rate=RATE) as pop3_relay:
        settings = {
            "legacy": {"imap_port": imap_relay.port, "pop3_port": pop3_relay.port, "timeout": 30.0},
            "limits": {"cutover_grace": 2.0, "sweep_interval": 1.0, "lease_seconds": 20.0},
            # the relays lead nowhere until the lab is up: no NAMESPACE question at start (the lab's legacy
            # server has the default namespace anyway)
            "mail": {"namespace_prefix": "", "namespace_separator": "/"},
        }
        with running_lab("ap-act-", users=2, messages_per_user=120, settings=settings) as info:
            lg = info["legacy"]
            imap_relay.point_at(lg["host"], lg["imap"])
            pop3_relay.point_at(lg["host"], lg["pop3"])
            info["relays"] = (imap_relay, pop3_relay)
            yield info


@pytest.fixture(scope="module")
def store(lab: dict[str, Any]) -> Iterator[Store]:
    s = open_store(config.load(lab["config"]).store.url)
    yield s
    s.close()


# --- reading a mailbox ------------------------------------------------------------------------------------------


def _folders(c: imaplib.IMAP4, command: str = "LIST") -> list[str]:
    typ, data = c._simple_command(command, '""', '"*"')
    typ, data = c._untagged_response(typ, data, command)
    out = []
    for line in data:
        if not isinstance(line, bytes):
            continue
        flags, _, rest = line.partition(b") ")
        if b"\\noselect" in flags.lower() and command == "LIST":
            continue
        name = rest.split(b" ", 1)[1].strip()
        out.append(name.strip(b'"').decode())
    return out


def _q(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def read_mailbox(c: imaplib.IMAP4) -> tuple[Model, dict[str, list[str]], set[str]]:
    """(folder -> Message-ID -> flags, folder -> every Message-ID as often as it occurs, subscriptions)."""
    model: Model = {}
    dupes: dict[str, list[str]] = {}
    for folder in _folders(c):
        typ, _ = c.select(_q(folder), readonly=True)
        assert typ == "OK", folder
        typ, data = c.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        ids: list[str] = []
        flags_of: dict[str, set[str]] = {}
        for item in data:
            if not isinstance(item, tuple):
                continue
            m = _MID.search(item[1])
            mid = m.group(1).decode() if m else f"(none {item[0]!r})"
            flags = set(imaplib.ParseFlags(item[0])) - {b"\\Recent"}
            ids.append(mid)
            flags_of[mid] = {f.decode() for f in flags}
        model[folder] = flags_of
        dupes[folder] = ids
    return model, dupes, set(_folders(c, "LSUB"))


# --- the user ---------------------------------------------------------------------------------------------------


class User:
    """An IMAP and POP3 client at the target that retries like a mail client, and the model of what it did."""

    def __init__(self, lab: dict[str, Any], user: dict[str, Any], store: Store, model: Model, subs: set[str],
                 uidls: dict[str, str]) -> None:  # fmt: skip
        self.tg = lab["target"]
        self.user = user
        self.store = store
        self.model = model
        self.subs = subs
        self.uidls = uidls  # Message-ID -> POP3 UIDL (kept by the migration)
        self.conn: imaplib.IMAP4 | None = None
        self.log: list[tuple[str, str, str]] = []  # (step, state when started, state when confirmed)
        # (start, end, state at start) of every try of every step: a try in cutover can wait for its answer as long
        # as Dovecot's auth_failure_delay, so the answer, not only the start, tells when the server was asked
        self.attempts: list[tuple[float, float, str]] = []
        self.retries: dict[str, int] = {}

    def state(self) -> str:
        s = self.store.state_of(self.user["address"])
        return s.value if s else "(none)"

    def _imap(self) -> imaplib.IMAP4:
        if self.conn is None:
            c = imaplib.IMAP4(self.tg["host"], self.tg["imap"], timeout=60)
            try:
                c.login(self.user["login"], self.user["password"])
            except BaseException:
                c.shutdown()
                raise
            self.conn = c
        return self.conn

    def do(self, name: str, step: Callable[[imaplib.IMAP4], None], deadline: float = 120) -> None:
        """Run one step until the server confirmed it (reconnecting when the session goes away)."""
        started = self.state()
        until = time.monotonic() + deadline
        while True:
            tried = (time.time(), self.state())
            try:
                step(self._imap())
                self.attempts.append((tried[0], time.time(), tried[1]))
                break
            except (imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError) as e:
                self.attempts.append((tried[0], time.time(), tried[1]))
                self.retries[started] = self.retries.get(started, 0) + 1
                if self.conn is not None:
                    with contextlib.suppress(OSError):
                        self.conn.shutdown()
                    self.conn = None
                if time.monotonic() > until:
                    raise AssertionError(f"{name} never succeeded: {e}") from e
                time.sleep(0.2)
        self.log.append((name, started, self.state()))

    def pop3(self, name: str, uidl: str, deadline: float = 120) -> None:
        """RETR and DELE the message with this UIDL, committed by QUIT; retried like do()."""
        started = self.state()
        until = time.monotonic() + deadline
        while True:
            tried = (time.time(), self.state())
            try:
                p = poplib.POP3(self.tg["host"], self.tg["pop3"], timeout=60)
                try:
                    p.user(self.user["login"])
                    p.pass_(self.user["password"])
                    numbers = {line.split()[1].decode(): line.split()[0].decode() for line in p.uidl()[1]}
                    if uidl in numbers:
                        p.retr(int(numbers[uidl]))
                        p.dele(int(numbers[uidl]))
                    p.quit()
                finally:
                    with_close(p)
                self.attempts.append((tried[0], time.time(), tried[1]))
                break
            except (poplib.error_proto, OSError) as e:
                self.attempts.append((tried[0], time.time(), tried[1]))
                self.retries[started] = self.retries.get(started, 0) + 1
                if time.monotonic() > until:
                    raise AssertionError(f"{name} never succeeded: {e}") from e
                time.sleep(0.2)
        self.log.append((name, started, self.state()))

    # -- steps: each looks before it acts, so running it again after a lost answer is harmless --
    @staticmethod
    def uid_of(c: imaplib.IMAP4, folder: str, mid: str) -> str | None:
        typ, _ = c.select(_q(folder))
        if typ != "OK":
            raise imaplib.IMAP4.error(f"SELECT {folder}")
        typ, data = c.uid("SEARCH", "HEADER", "Message-ID", mid)
        if typ != "OK":
            raise imaplib.IMAP4.error("SEARCH")
        uids = data[0].split()
        return uids[0].decode() if uids else None

    def round(self, r: int, inbox: list[str], other: tuple[str, list[str]], dest: str) -> None:
        """One round of changes; the ones that use up a message of the original mailbox while any are left."""
        originals = 3 * r + 2 < len(inbox) and r < len(other[1])
        kw = f"act{r % 5}"  # Maildir keeps 26 keywords per folder

        def store_flags(sign: str, flags: str, mid: str, folder: str = "INBOX") -> Callable[[imaplib.IMAP4], None]:
            def step(c: imaplib.IMAP4) -> None:
                uid = self.uid_of(c, folder, mid)
                assert uid is not None, (folder, mid)
                typ, _ = c.uid("STORE", uid, f"{sign}FLAGS.SILENT", f"({flags})")
                if typ != "OK":
                    raise imaplib.IMAP4.error("STORE")

            return step

        flag_mid = inbox[3 * r] if originals else inbox[0]
        self.do(f"r{r} flag", store_flags("+", f"\\Flagged {kw} $Label{r % 3}", flag_mid))
        self.model["INBOX"][flag_mid] |= {"\\Flagged", kw, f"$Label{r % 3}"}
        self.do(f"r{r} unflag", store_flags("-", f"\\Flagged $Label{r % 3}", flag_mid))
        self.model["INBOX"][flag_mid] -= {"\\Flagged", f"$Label{r % 3}"}

        sent_mid = f"<sent-{r}-{time.time_ns()}@active.test>"
        raw = (f"From: {self.user['address']}\r\nTo: friend@example.net\r\nSubject: round {r}\r\n"
               f"Message-ID: {sent_mid}\r\nDate: {email.utils.formatdate()}\r\n\r\nround {r}\r\n").encode()  # fmt: skip

        def append(c: imaplib.IMAP4) -> None:
            if self.uid_of(c, "Sent", sent_mid) is None:
                typ, _ = c.append("Sent", "(\\Seen $Sent)", imaplib.Time2Internaldate(1_600_000_000 + r), raw)
                if typ != "OK":
                    raise imaplib.IMAP4.error("APPEND")

        self.do(f"r{r} append", append)
        self.model["Sent"][sent_mid] = {"\\Seen", "$Sent"}

        if originals:
            self._expunge_and_move(r, inbox[3 * r + 1], other[0], other[1][r], dest)

        made, renamed, dropped = f"Act{r}", f"Act{r}-renamed", f"Act{r}-unsub"

        def folders(c: imaplib.IMAP4) -> None:
            have = set(_folders(c))
            if renamed not in have:
                if made not in have:
                    c.create(made)
                typ, _ = c.rename(made, renamed)
                if typ != "OK":
                    raise imaplib.IMAP4.error("RENAME")
            typ, _ = c.subscribe(renamed)
            if dropped not in have:
                c.create(dropped)
            c.subscribe(dropped)
            typ, _ = c.unsubscribe(dropped)
            if typ != "OK":
                raise imaplib.IMAP4.error("UNSUBSCRIBE")

        self.do(f"r{r} folders", folders)
        self.model[renamed] = {}
        self.model[dropped] = {}
        self.subs.add(renamed)

        if originals:
            pop_mid = inbox[3 * r + 2]
            self.pop3(f"r{r} pop3", self.uidls[pop_mid])
            del self.model["INBOX"][pop_mid]

    def _expunge_and_move(self, r: int, move_mid: str, other_folder: str, gone: str, dest: str) -> None:
        def expunge(c: imaplib.IMAP4) -> None:
            uid = self.uid_of(c, other_folder, gone)
            if uid is not None:
                c.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)")
                typ, _ = c.uid("EXPUNGE", uid)
                if typ != "OK":
                    raise imaplib.IMAP4.error("UID EXPUNGE")

        self.do(f"r{r} expunge", expunge)
        del self.model[other_folder][gone]

        def move(c: imaplib.IMAP4) -> None:
            uid = self.uid_of(c, "INBOX", move_mid)
            if uid is not None:
                typ, _ = c.uid("MOVE", uid, _q(dest))
                if typ != "OK":
                    raise imaplib.IMAP4.error("UID MOVE")

        self.do(f"r{r} move", move)
        self.model[dest][move_mid] = self.model["INBOX"].pop(move_mid)


def with_close(p: poplib.POP3) -> None:
    with contextlib.suppress(OSError):
        p.close()


# --- mail in every phase ----------------------------------------------------------------------------------------


class Sender(threading.Thread):
    def __init__(self, lab: dict[str, Any], user: dict[str, Any], store: Store) -> None:
        super().__init__(daemon=True)
        self.tg = lab["target"]
        self.user = user
        self.store = store
        self.stop = threading.Event()
        self.sent: dict[str, str] = {}  # Message-ID -> state when accepted
        self.error: BaseException | None = None

    def run(self) -> None:
        n = 0
        try:
            while not self.stop.wait(0.25):
                n += 1
                mid = f"<mail-{n}-{time.time_ns()}@sender.test>"
                with smtplib.SMTP(self.tg["host"], self.tg["smtp"], timeout=60) as s:
                    s.sendmail("sender@sender.test", [self.user["address"]],
                               f"From: sender@sender.test\r\nTo: {self.user['address']}\r\nMessage-ID: {mid}\r\n"
                               f"Subject: mail {n}\r\n\r\nmail {n}\r\n".encode())  # fmt: skip
                state = self.store.state_of(self.user["address"])
                self.sent[mid] = state.value if state else "(none)"
        except BaseException as e:  # reported by the test
            self.error = e


def slow_down_in_cutover(lab: dict[str, Any], store: Store, address: str) -> None:
    """Once the account is in cutover, the legacy side gets slower still, so the final delta lasts about a
    second and the user's retries fall before, during and after it."""
    deadline = time.monotonic() + 240
    while store.state_of(address) is not State.CUTOVER and time.monotonic() < deadline:
        time.sleep(0.02)
    for relay in lab["relays"]:
        relay.rate = 15_000


def test_a_user_working_through_the_move_loses_nothing(lab: dict[str, Any], store: Store) -> None:
    lg, tg = lab["legacy"], lab["target"]
    user = lab["users"][0]
    address = user["address"]

    # the legacy mailbox before the move (directly, not through the relay)
    with imaplib.IMAP4(lg["host"], lg["imap"], timeout=60) as c:
        c.login(user["login"], user["password"])
        model, _, subs = read_mailbox(c)
        c.select("INBOX", readonly=True)
    p = poplib.POP3(lg["host"], lg["pop3"], timeout=60)
    p.user(user["login"])
    p.pass_(user["password"])
    uidls: dict[str, str] = {}
    for line in p.uidl()[1]:
        number, uidl = line.decode().split()
        m = _MID.search(b"\n".join(p.top(int(number), 0)[1]))
        if m:
            uidls[m.group(1).decode()] = uidl
    p.quit()

    inbox = sorted(model["INBOX"])
    others = sorted(((f, sorted(ids)) for f, ids in model.items() if f not in ("INBOX", "Sent", "Trash")),
                    key=lambda x: -len(x[1]))  # fmt: skip
    other = others[0]
    dest = others[1][0]
    assert len(inbox) >= 30 and len(other[1]) >= 10, (len(inbox), other[0], len(other[1]))

    u = User(lab, user, store, model, {s for s in subs if s not in AUTO_SUBSCRIBED}, uidls)
    sender = Sender(lab, user, store)
    sender.start()
    # the first message before the first login: Postfix's address verification probes the legacy server for the
    # first RCPT (the answer is cached after that), which can hold that one transaction for seconds; then the
    # copying phase, not the probe, is what the next messages meet
    wait_for(lambda: bool(sender.sent) or sender.error is not None, 60, "the first message", interval=0.05)
    assert sender.error is None, sender.error
    slower = threading.Thread(target=slow_down_in_cutover, args=(lab, store, address), daemon=True)
    slower.start()
    migrated_rounds = 0
    deadline = time.monotonic() + 240
    try:
        r = 0
        while migrated_rounds < 2:
            assert time.monotonic() < deadline, f"the account did not migrate in time: {u.state()}"
            round_started = time.monotonic()
            u.round(r, inbox, other, dest)
            r += 1
            if u.state() == State.MIGRATED.value:
                migrated_rounds += 1
            time.sleep(max(0.0, 1.0 - (time.monotonic() - round_started)))  # a person's pace, not a loop's
    finally:
        sender.stop.set()
        sender.join(60)
        if u.conn is not None:
            u.conn.shutdown()
    assert sender.error is None, sender.error

    started = {s for _n, s, _e in u.log}
    confirmed = {e for _n, _s, e in u.log}
    phases = set(sender.sent.values())
    per_phase = {s: list(sender.sent.values()).count(s) for s in phases}
    print(f"steps started per phase: { {s: sum(1 for _n, x, _e in u.log if x == s) for s in started} }; "
          f"retried: {u.retries}; mail accepted per phase: {per_phase}; "
          f"relayed {lab['relays'][0].bytes_down} bytes")  # fmt: skip
    assert {"copying", "migrated"} <= confirmed, u.log
    # the user kept trying in cutover, before the delta (kicked, logins answered "temporary failure") and while
    # it read the legacy mailbox
    quiesced = next(e.at for e in store.events(address) if e.kind == "quiesced")
    account = store.get(address)
    assert account is not None and account.migrated_at is not None
    before = [t for t, e, s in u.attempts if s == "cutover" and e < quiesced]
    during = [t for t, e, _s in u.attempts if t < account.migrated_at and e >= quiesced]  # asked or answered in it
    print(f"attempts in cutover before the delta: {len(before)}, during it: {len(during)}; delta "
          f"{account.migrated_at - quiesced:.2f} s")  # fmt: skip
    assert before and during, (len(before), len(during))
    # (a step started in copying may meet the cutover only in its retries: the state of every try counts)
    assert {"copying", "cutover", "migrated"} <= {s for _t, _e, s in u.attempts}, u.log
    assert {"copying", "cutover", "migrated"} <= phases, sender.sent

    # every accepted message reaches the target (held mail released); a sweep after the last one finds nothing
    account = store.get(address)
    assert account is not None and account.state is State.MIGRATED
    for mid in sender.sent:
        model["INBOX"][mid] = set()

    def sweeps_started() -> int:
        return sum(j.attempts for j in store.jobs(address) if j.kind == "sweep")

    before = sweeps_started()
    deadline = time.monotonic() + 60
    while True:
        with imaplib.IMAP4(tg["host"], tg["imap"], timeout=60) as c:
            c.login(user["login"], user["password"])
            target, dupes, target_subs = read_mailbox(c)
        # a whole sweep ran after the last message was accepted, and every message is there
        if sweeps_started() >= before + 2 and all(mid in target.get("INBOX", {}) for mid in sender.sent):
            break
        assert time.monotonic() < deadline, "mail or sweeps did not arrive in time"
        time.sleep(0.5)
    hits = [e.detail for e in store.events(address) if e.kind == "sweep-hit"]
    assert hits == [], hits  # nothing reached the legacy mailbox after the final delta

    for folder, ids in dupes.items():
        twice = {m for m in ids if ids.count(m) > 1}
        assert not twice, f"{folder}: {sorted(twice)[:5]} more than once"
    missing = {f: sorted(set(model[f]) - set(target.get(f, {}))) for f in model}
    extra = {f: sorted(set(target[f]) - set(model.get(f, {}))) for f in target}
    assert not any(missing.values()), missing
    assert not any(extra.values()), extra
    flags = {(f, m): (model[f][m], target[f][m]) for f in model for m in model[f] if model[f][m] != target[f][m]}
    assert not flags, list(flags.items())[:5]
    assert set(target) == set(model), (set(target) ^ set(model))
    assert target_subs - AUTO_SUBSCRIBED == u.subs
