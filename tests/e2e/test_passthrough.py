"""Pass-through authentication end to end (issue 3): real legacy server, real target Postfix + Dovecot, sidecar.

What a user sees on IMAP, POP3 and SMTP AUTH (target submission port), and what the store holds afterwards:
first login of an unmigrated user, wrong passwords, legacy server down, migrated accounts (native login, old
password refused, store down is temporary), bare login names, concurrent first logins, brute force.

Two labs: `lab` (SQLite store, addresses as logins) and `bare` (bare login names, small failure budgets).
Tests that fail on purpose use client addresses of their own: Dovecot's auth penalty is per client address.
The legacy lab Dovecot also penalises the sidecar's address after wrong passwords (as a real one would), so
the wrong-password tests come after the first-login tests in this file.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.labs import running_lab
from harness.passthrough_helpers import (
    LogMark,
    hash_accepts,
    imap_mailbox,
    imap_result,
    pop3_result,
    smtp_auth_result,
)
from harness.waiting import wait_for

from sidecar import config
from sidecar.auth import passwords
from sidecar.config import HashConfig
from sidecar.lab import launcher, legacy, target
from sidecar.migration.cutover import flush_auth_cache
from sidecar.states import State
from sidecar.store import open_store
from sidecar.store.base import Store

CLIENT = "127.0.0.1"


# no copies on this node: accounts stay where the state machine puts them (the copier has its own tests)
LAB = {"prefix": "ap-pt-", "users": 8, "settings": {"limits": {"copy_concurrency": 0}}}


@pytest.fixture(scope="module")
def bare() -> Iterator[dict[str, Any]]:
    limits = {
        "copy_concurrency": 0,
        "auth_failures_per_account": 3,
        "auth_failures_per_client": 4,
        "auth_failure_window": 600.0,
    }
    with running_lab("ap-pt-", users=4, bare_logins=True, settings={"limits": limits}) as info:
        yield info


def user(info: dict[str, Any], i: int) -> dict[str, str]:
    u: dict[str, str] = info["users"][i]
    return u


def tgt(info: dict[str, Any]) -> tuple[str, int, int, int]:
    t = info["target"]
    return t["host"], t["imap"], t["pop3"], t["submission"]


def stored_hash(info: dict[str, Any], address: str, timeout: float = 10.0) -> str:
    """The hash the store keeps for an account (the Account record never carries it). The sidecar stores it
    right after answering the login (sidecar/auth/policy.py, `defer`): wait for it, up to `timeout`."""
    url: str = info["store"]
    assert url.startswith("sqlite:///")
    deadline = time.monotonic() + timeout
    while True:
        db = sqlite3.connect(f"file:{url.removeprefix('sqlite:///')}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT password_hash FROM accounts WHERE address = ?", (address,)).fetchone()
        finally:
            db.close()
        if (row and row[0]) or time.monotonic() > deadline:
            return str(row[0]) if row and row[0] else ""
        time.sleep(0.05)


def legacy_mailbox(info: dict[str, Any], u: dict[str, str]) -> tuple[int, int]:
    lg = info["legacy"]
    return imap_mailbox(lg["host"], lg["imap"], u["login"], u["password"], source="127.0.0.60")


def migrate(store: Store, address: str, lab: dict[str, Any]) -> None:
    """Move an account through the state machine as the copy job runner will, flush included: Dovecot's auth
    cache still holds the sql passdb's "no such user" of the logins made while the account was copying."""
    store.transition(address, State.CUTOVER, expect=State.COPYING, reason="test: initial copy done")
    store.transition(address, State.MIGRATED, expect=State.CUTOVER, reason="test: final delta done")
    flush(lab, address)


def flush(lab: dict[str, Any], *names: str) -> None:
    """What autoport does on this node after it changes an account's answer (the migration, `autoport passwd`)."""
    flush_auth_cache(config.load(lab["config"]), list(names))


def wait_for_line(mark: LogMark, needle: str, timeout: float = 5.0) -> None:
    wait_for(lambda: any(needle in ln for ln in mark.lines()), timeout,
             lambda: f"{needle!r} in {mark.path}: {mark.lines()[-5:]}", interval=0.1)  # fmt: skip


def legacy_auth_lines(mark: LogMark) -> list[str]:
    """Login attempts the legacy Dovecot saw (successes and failures), from its log."""
    return [ln for ln in mark.lines() if re.search(r"-login: (Info: )?Login:", ln) or "auth failed" in ln]


# --- first login of an unmigrated user ----------------------------------------------------------------------


def test_first_imap_login_shows_the_legacy_mailbox_and_starts_the_migration(
    lab: dict[str, Any], store: Store
) -> None:
    host, imap, _, _ = tgt(lab)
    u = user(lab, 0)
    address = u["address"]
    assert store.get(address) is None

    seen = imap_mailbox(host, imap, u["login"], u["password"], source=CLIENT)

    assert seen == legacy_mailbox(lab, u)  # (UIDVALIDITY, message count) of the legacy INBOX: proxied
    assert seen[1] > 0
    acct = store.get(address)
    assert acct is not None and acct.state is State.COPYING
    pw_hash = stored_hash(lab, address)
    assert pw_hash.startswith("{ARGON2ID}$argon2id$")
    assert hash_accepts(pw_hash, u["password"])
    assert not hash_accepts(pw_hash, u["password"] + "x")
    assert [j.kind for j in store.jobs(address)] == ["copy"]


def test_first_pop3_login_is_proxied_and_starts_the_migration(lab: dict[str, Any], store: Store) -> None:
    host, _, pop3, _ = tgt(lab)
    u = user(lab, 1)

    status, count = pop3_result(host, pop3, u["login"], u["password"], source=CLIENT)

    assert status == "+OK"
    assert int(count) == legacy_mailbox(lab, u)[1]
    acct = store.get(u["address"])
    assert acct is not None and acct.state is State.COPYING
    assert hash_accepts(stored_hash(lab, u["address"]), u["password"])
    assert len(store.jobs(u["address"])) == 1


def test_first_smtp_auth_succeeds_and_starts_the_migration(lab: dict[str, Any], store: Store) -> None:
    host, _, _, submission = tgt(lab)
    u = user(lab, 2)

    code, _text = smtp_auth_result(host, submission, u["login"], u["password"], source=CLIENT)

    assert code == 235
    acct = store.get(u["address"])
    assert acct is not None and acct.state is State.COPYING
    assert hash_accepts(stored_hash(lab, u["address"]), u["password"])
    assert len(store.jobs(u["address"])) == 1


def test_thirty_concurrent_first_logins_make_one_account_one_job_one_legacy_check(
    lab: dict[str, Any], store: Store
) -> None:
    host, imap, _, _ = tgt(lab)
    u = user(lab, 5)
    mark = LogMark(Path(lab["logs"]) / "legacy-dovecot.log")
    sidecar_log = LogMark(Path(lab["logs"]) / "sidecar.log")

    def login(_: int) -> tuple[str, str]:
        return imap_result(host, imap, u["login"], u["password"], source=CLIENT)

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        results = list(pool.map(login, range(30)))

    assert [r[0] for r in results] == ["OK"] * 30, {r[1] for r in results if r[0] != "OK"}
    acct = store.get(u["address"])
    assert acct is not None and acct.state is State.COPYING
    assert len(store.jobs(u["address"])) == 1
    decisions = [ln for ln in sidecar_log.lines() if "sidecar.auth: auth " in ln and u["address"] in ln]
    assert len(decisions) == 30
    # one check on the legacy server; the other 29 answered from the sidecar's positive cache
    assert sum(" auth ok account=" in ln for ln in decisions) == 1
    assert sum(" auth ok-cached account=" in ln for ln in decisions) == 29
    verifier_logins = [ln for ln in legacy_auth_lines(mark) if "Login:" in ln]
    assert len(verifier_logins) >= 30  # 30 proxied sessions (+1 check)


# --- migrated accounts: native, old password refused -----------------------------------------------------


def test_migrated_account_logs_in_natively_and_its_old_password_fails(lab: dict[str, Any], store: Store) -> None:
    host, imap, pop3, submission = tgt(lab)
    u = user(lab, 3)
    address, old = u["address"], u["password"]
    assert imap_result(host, imap, u["login"], old, source=CLIENT)[0] == "OK"  # first login: copying
    assert stored_hash(lab, address)  # stored right after the answer
    migrate(store, address, lab)

    # with the verified password, now natively: served by the target Dovecot (its empty Maildir: no copier
    # ran), not by the legacy server, whose INBOX has messages
    dlog = LogMark(Path(lab["logs"]) / "target-dovecot.log")
    slog = LogMark(Path(lab["logs"]) / "sidecar.log")
    uidvalidity, count = imap_mailbox(host, imap, u["login"], old, source=CLIENT)
    assert count == 0 and legacy_mailbox(lab, u)[1] > 0
    assert uidvalidity != legacy_mailbox(lab, u)[0]
    wait_for_line(dlog, f"imap({address})")
    assert not [ln for ln in slog.lines() if address in ln]  # the sidecar was not asked

    # the stored hash changes (the user changed the password on the target): the old legacy password fails
    new = "N3w-" + old[::-1]
    store.set_password_hash(address, passwords.hash_password(new, HashConfig()))
    flush(lab, address)  # as `autoport passwd` does
    assert imap_result(host, imap, u["login"], new, source=CLIENT)[0] == "OK"
    assert pop3_result(host, pop3, u["login"], new, source=CLIENT)[0] == "+OK"
    assert smtp_auth_result(host, submission, u["login"], new, source=CLIENT)[0] == 235
    lmark = LogMark(Path(lab["logs"]) / "legacy-dovecot.log")
    slog = LogMark(Path(lab["logs"]) / "sidecar.log")
    typ, text = imap_result(host, imap, u["login"], old, source="127.0.0.30")
    assert (typ, "[AUTHENTICATIONFAILED]" in text) == ("NO", True), text
    status, text = pop3_result(host, pop3, u["login"], old, source="127.0.0.30")
    assert status == "-ERR" and "[AUTH]" in text, text
    assert smtp_auth_result(host, submission, u["login"], old, source="127.0.0.30")[0] == 535
    # refused by the deny step: neither the sidecar nor the legacy server was asked
    assert not [ln for ln in slog.lines() if address in ln]
    assert not [ln for ln in legacy_auth_lines(lmark) if address in ln]
    assert store.state_of(address) is State.MIGRATED


# --- wrong passwords, legacy down --------------------------------------------------------------------------


def test_wrong_password_fails_on_every_protocol_and_creates_nothing(lab: dict[str, Any], store: Store) -> None:
    host, imap, pop3, submission = tgt(lab)
    u = user(lab, 4)
    # a different wrong password each time, so each one is checked on the legacy server (none from a cache)
    code, text = smtp_auth_result(host, submission, u["login"], "wrong-1", source="127.0.0.31")
    assert code == 535, text
    typ, text = imap_result(host, imap, u["login"], "wrong-2", source="127.0.0.32")
    assert typ == "NO" and "[AUTHENTICATIONFAILED]" in text, text
    status, text = pop3_result(host, pop3, u["login"], "wrong-3", source="127.0.0.33")
    assert status == "-ERR" and "[AUTH]" in text, text
    assert store.get(u["address"]) is None
    assert store.jobs(u["address"]) == []


def _stop_legacy(info: dict[str, Any]) -> legacy.LegacyServer:
    d = Path(info["dir"])
    srv = legacy.load_legacy(d)
    assert srv is not None
    legacy.stop_legacy(d)
    return srv


def test_legacy_down_is_a_temporary_failure(lab: dict[str, Any], store: Store) -> None:
    host, imap, pop3, submission = tgt(lab)
    u = user(lab, 6)
    d = Path(lab["dir"])
    srv = _stop_legacy(lab)
    try:
        typ, text = imap_result(host, imap, u["login"], u["password"], source="127.0.0.34")
        assert typ == "NO" and "[UNAVAILABLE]" in text, text
        status, text = pop3_result(host, pop3, u["login"], u["password"], source="127.0.0.34")
        assert status == "-ERR" and "[SYS/TEMP]" in text, text
        assert store.get(u["address"]) is None
        code, text = smtp_auth_result(host, submission, u["login"], u["password"], source="127.0.0.34")
        assert code == 454, (code, text)
        assert store.get(u["address"]) is None
    finally:
        for name in legacy.COMPONENTS:
            legacy._start_component(d, srv, name)
    # back: the same login now works and starts the migration
    assert imap_result(host, imap, u["login"], u["password"], source="127.0.0.34")[0] == "OK"
    assert store.state_of(u["address"]) is State.COPYING


def test_smtp_auth_while_legacy_down_is_454_and_a_wrong_password_still_535(
    lab: dict[str, Any], store: Store
) -> None:
    """Postfix 3.7 answers 535 to every Dovecot FAIL, `temp` included; the sidecar's SASL relay closes the
    connection on a temporary FAIL instead, which Postfix answers with 454 (sidecar/edge/saslrelay.py)."""
    host, _, _, submission = tgt(lab)
    u = user(lab, 7)
    d = Path(lab["dir"])
    srv = _stop_legacy(lab)
    try:
        for _ in range(2):  # the second on the connection smtpd opened again after the relay closed the first
            code, text = smtp_auth_result(host, submission, u["login"], u["password"], source="127.0.0.35")
            assert code == 454 and "Temporary authentication failure" in text, (code, text)
    finally:
        for name in legacy.COMPONENTS:
            legacy._start_component(d, srv, name)
    assert store.get(u["address"]) is None
    # back: an ordinary failure is passed through as it was (535), nothing created
    code, text = smtp_auth_result(host, submission, u["login"], u["password"] + "x", source="127.0.0.35")
    assert code == 535, (code, text)
    assert store.get(u["address"]) is None


# --- the store down: temporary, never a fall-through to legacy ----------------------------------------------


def test_store_unreadable_by_dovecot_is_temporary_for_everyone(lab: dict[str, Any], store: Store) -> None:
    host, imap, pop3, submission = tgt(lab)
    d = Path(lab["dir"])
    migrated = user(lab, 3)  # migrated above, with a new password; its old one must not reach legacy
    fresh = user(lab, 7)
    db = Path(lab["store"].removeprefix("sqlite:///"))
    assert store.state_of(migrated["address"]) is State.MIGRATED
    dir_mode = db.parent.stat().st_mode & 0o7777
    slog = LogMark(Path(lab["logs"]) / "sidecar.log")
    try:
        os.chmod(db.parent, 0o700)  # the dovecot user can no longer reach the store
        launcher.lab_restart(d, "target-dovecot")  # its auth worker kept the database open
        for who, pw in ((migrated, migrated["password"]), (fresh, fresh["password"])):
            typ, text = imap_result(host, imap, who["login"], pw, source="127.0.0.36")
            assert typ == "NO" and "[UNAVAILABLE]" in text, (who["login"], text)
            status, text = pop3_result(host, pop3, who["login"], pw, source="127.0.0.36")
            assert status == "-ERR" and "[SYS/TEMP]" in text, text
            code, text = smtp_auth_result(host, submission, who["login"], pw, source="127.0.0.36")
            assert code == 454, (who["login"], code, text)
    finally:
        os.chmod(db.parent, dir_mode)
        launcher.lab_restart(d, "target-dovecot")
    assert not [ln for ln in slog.lines() if "sidecar.auth: auth " in ln]  # checkpassword never ran
    assert store.get(fresh["address"]) is None


# --- bare login names ---------------------------------------------------------------------------------------


def test_bare_login_name_migrates_and_routes(bare: dict[str, Any]) -> None:
    host, imap, pop3, submission = tgt(bare)
    u = user(bare, 0)
    assert "@" not in u["login"]
    store = open_store(bare["store"])
    try:
        assert imap_mailbox(host, imap, u["login"], u["password"], source=CLIENT)[1] > 0
        acct = store.find_by_login(u["login"])
        assert acct is not None and acct.address == u["address"] and acct.state is State.COPYING
        assert hash_accepts(stored_hash(bare, u["address"]), u["password"])
        assert len(store.jobs(u["address"])) == 1

        before = postmap(bare, u["address"])
        migrate(store, u["address"], bare)
        after = postmap(bare, u["address"])
        assert before != after and after.startswith("lmtp:"), (before, after)

        dlog = LogMark(Path(bare["logs"]) / "target-dovecot.log")
        assert imap_mailbox(host, imap, u["login"], u["password"], source=CLIENT)[1] == 0  # native, empty
        wait_for_line(dlog, f"imap({u['address']})")  # the session's user is the address (home, Maildir)
        assert pop3_result(host, pop3, u["login"], u["password"], source=CLIENT)[0] == "+OK"
        assert smtp_auth_result(host, submission, u["login"], u["password"], source=CLIENT)[0] == 235
        assert imap_result(host, imap, u["login"], u["password"] + "x", source="127.0.0.37")[0] == "NO"
    finally:
        store.close()


def postmap(info: dict[str, Any], address: str) -> str:
    """The target Postfix's transport for address, asked from its socketmap as Postfix does."""
    stack = target.load_target(Path(info["dir"]))
    assert stack is not None
    p = subprocess.run(
        ["postmap", "-c", str(stack.postfix_config), "-q", address, f"socketmap:{stack.socketmap}:transport"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return p.stdout.strip()


# --- brute force ---------------------------------------------------------------------------------------------


def test_brute_force_reaches_the_legacy_server_a_bounded_number_of_times(bare: dict[str, Any]) -> None:
    """200 wrong passwords for two accounts from four client addresses, IMAP and POP3 at once.

    Budgets in this lab: 3 failures per (account, client address), 4 per client address (per 600 s); each victim
    is attacked from two addresses, so the legacy server can see at most 2 x 2 x 3 = 12 checks (issue 14: the
    account budget is per client address, so guesses from elsewhere never lock the owner out; the account's
    total over all clients only makes answers temporary). Concurrency stays under Dovecot's login process limit
    (100 per service).
    """
    host, imap, pop3, _ = tgt(bare)
    victims = [user(bare, 1), user(bare, 2)]
    sources = [f"127.0.0.{n}" for n in (40, 41, 42, 43)]
    lmark = LogMark(Path(bare["logs"]) / "legacy-dovecot.log")
    attempts = [
        (proto, victims[i % 2], sources[i % 4], f"guess-{proto}-{i}") for proto in ("imap", "pop3") for i in range(100)
    ]

    def attempt(a: tuple[str, dict[str, str], str, str]) -> str:
        proto, v, src, pw = a
        if proto == "imap":
            return imap_result(host, imap, v["login"], pw, source=src, timeout=120)[0]
        return pop3_result(host, pop3, v["login"], pw, source=src, timeout=120)[0]

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(80) as pool:
        results = list(pool.map(attempt, attempts))
    elapsed = time.monotonic() - started

    assert set(results) <= {"NO", "-ERR"}, set(results)
    time.sleep(0.5)  # the legacy log line for the last check
    checks = legacy_auth_lines(lmark)
    # Every legacy attempt counts against the account's budget, including the ones the legacy server answers
    # only after legacy.timeout (its own penalty on our address grows with each wrong password): those are
    # TEMP for the client, and the verifier tries no second protocol after them.
    assert 1 <= len(checks) <= 12, (len(checks), checks)
    store = open_store(bare["store"])
    try:
        assert all(store.get(v["address"]) is None for v in victims)
    finally:
        store.close()
    # the account's owner still gets in from their own address: the attackers' budgets are theirs (issue 14)
    owner = imap_result(host, imap, victims[0]["login"], victims[0]["password"], source="127.0.0.44", timeout=120)
    assert owner[0] == "OK", owner
    print(f"brute force: {len(attempts)} attempts in {elapsed:.1f}s, {len(checks)} legacy checks")
