"""Issue 14 end to end: one identity per login, on a real legacy server and a real target.

The lab's legacy server has, besides its usual users, alice@other.test (a domain the target does not serve,
same local part as alice@example.test, another password), jsmith (login) for john.smith@example.test, and
zoe@example.test whose password has non-ASCII characters, quotes and a backslash.
Every attack spelling goes through IMAP, POP3 and SMTP AUTH at the target: each is refused or mapped to the
right account, and nothing is ever stored under another account. jsmith logs in by login, realm and address,
always as one account checked as `jsmith`. zoe migrates end to end and then logs in natively.
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import smtplib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from harness.labs import running_lab
from harness.passthrough_helpers import (
    SourceIMAP,
    hash_accepts,
    imap_result,
    pop3_result,
    retrying_temporary,
    smtp_auth_result,
)

from sidecar.lab import legacy
from sidecar.ops import cli
from sidecar.states import State
from sidecar.store import open_store
from sidecar.store.base import Store


@pytest.fixture(scope="module")
def lab() -> Iterator[dict[str, Any]]:
    settings = {"mail": {"realms": ["CORP"]}, "limits": {"cutover_grace": 0.0}}
    with running_lab("ap-id-", users=2, settings=settings, legacy_identity_users=True) as info:
        srv = legacy.load_legacy(Path(info["dir"]))
        info["extra"] = {k: {"login": u.login, "address": u.address, "password": u.password}
                         for k, u in srv.extra_users.items()}  # fmt: skip
        yield info


@pytest.fixture(scope="module")
def store(lab: dict[str, Any]) -> Iterator[Store]:
    s = open_store(lab["store"])
    yield s
    s.close()


def hash_stored(store: Store, address: str, password: str, wait: float = 20.0) -> bool:
    """The account's hash accepts password (it is stored right after the answer: poll a little)."""
    deadline = time.monotonic() + wait
    while True:
        stored = store.password_hash(address)
        if stored is not None and hash_accepts(stored, password):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def tgt(lab: dict[str, Any]) -> tuple[str, int, int, int]:
    t = lab["target"]
    return t["host"], t["imap"], t["pop3"], t["submission"]


def smtp_plain(host: str, port: int, login: str, password: str, source: str) -> int:
    """AUTH PLAIN with UTF-8 credentials (smtplib's login() only takes ASCII); the reply code."""
    with smtplib.SMTP(host, port, timeout=30, source_address=(source, 0)) as smtp:
        smtp.ehlo("client.lab.test")
        blob = base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode()).decode("ascii")
        code, _ = smtp.docmd("AUTH", "PLAIN " + blob)
        return int(code)


def all_protocols(lab: dict[str, Any], login: str, password: str, source: str) -> list[bool]:
    host, imap, pop3, sub = tgt(lab)
    results = []
    with contextlib.suppress(UnicodeEncodeError):  # imaplib cannot quote it: the client could not send it
        results.append(imap_result(host, imap, login, password, source)[0] == "OK")
    with contextlib.suppress(UnicodeEncodeError):
        results.append(pop3_result(host, pop3, login, password, source)[0] == "+OK")
    results.append(smtp_plain(host, sub, login, password, source) == 235)
    return results


def test_attack_spellings_are_refused_and_store_nothing_elsewhere(lab: dict[str, Any], store: Store) -> None:
    alice = lab["users"][0]
    other = lab["extra"]["other"]
    spellings = [
        (other["login"], other["password"]),  # alice@other.test, its own (correct) legacy password
        ("OTHER\\alice", other["password"]),
        ("CORP\\alice", other["password"]),  # an allowed realm, but alice@example.test's check: wrong password
        (alice["address"] + "*admin", other["password"]),
        ("alice@example.test.", other["password"]),
        ("alice@v1@example.test", other["password"]),
        ("\u212alice@example.test", other["password"]),  # Kelvin sign
        ("ali\u200bce@example.test", other["password"]),
        ("alice@xn--exmple-cua.test", other["password"]),
    ]
    # one client address per spelling: Dovecot's auth penalty grows per address, and each refusal waits out
    # Dovecot's failure delay, so the spellings are tried at once (fewer than [limits] auth_concurrency checks)
    with ThreadPoolExecutor(len(spellings)) as pool:
        results = list(pool.map(lambda sp: all_protocols(lab, sp[1][0], sp[1][1], f"127.0.0.{61 + sp[0]}"),
                                enumerate(spellings)))  # fmt: skip
    for (login, _password), accepted in zip(spellings, results, strict=True):
        assert not any(accepted), login
    addresses = {a.address for a in store.accounts()}
    assert addresses <= {alice["address"]}, addresses  # no phantom accounts; nothing for other.test
    acc = store.get(alice["address"])
    if acc is not None:
        stored = store.password_hash(alice["address"])
        assert stored is None or not hash_accepts(stored, other["password"])
    # guesses from elsewhere never make alice's right password fail
    host, imap, _, _ = tgt(lab)
    assert imap_result(host, imap, alice["login"], alice["password"], "127.0.0.1")[0] == "OK"
    assert hash_stored(store, alice["address"], alice["password"])


def test_login_map_one_account_checked_as_its_legacy_login(lab: dict[str, Any], store: Store, tmp_path: Path) -> None:
    js = lab["extra"]["jsmith"]
    users = tmp_path / "users.csv"
    users.write_text(f"jsmith,{js['address']},sales@example.test\n")
    assert cli.main(["--config", lab["config"], "import-users", str(users)]) == 0
    host, imap, pop3, sub = tgt(lab)
    for login in ("jsmith", "CORP\\jsmith", js["address"], "sales@example.test"):
        for call, port, ok in ((imap_result, imap, "OK"), (pop3_result, pop3, "+OK"), (smtp_auth_result, sub, 235)):
            assert retrying_temporary(call, host, port, login, js["password"], "127.0.0.1")[0] == ok, login
    assert "sales@example.test" not in {a.address for a in store.accounts()}
    acc = store.get(js["address"])
    assert acc is not None and "jsmith" in acc.logins
    assert hash_stored(store, js["address"], js["password"])


def _authenticate_plain(host: str, port: int, login: str, password: str) -> str:
    imap = SourceIMAP(host, port, "127.0.0.1")
    try:
        blob = b"\0" + login.encode() + b"\0" + password.encode()
        typ, _ = imap.authenticate("PLAIN", lambda _c: blob)
        return str(typ)
    except imaplib.IMAP4.error:
        return "NO"
    finally:
        imap.shutdown()


def test_non_ascii_password_migrates_end_to_end(lab: dict[str, Any], store: Store) -> None:
    zoe = lab["extra"]["nonascii"]
    host, imap, _, sub = tgt(lab)
    assert smtp_plain(host, sub, zoe["login"], zoe["password"], "127.0.0.1") == 235
    assert _authenticate_plain(host, imap, zoe["login"], zoe["password"]) == "OK"  # proxied to legacy
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        acc = store.get(zoe["address"])
        if acc is not None and acc.state in (State.MIGRATED, State.FAILED):
            break
        time.sleep(0.2)
    acc = store.get(zoe["address"])
    assert acc is not None and acc.state is State.MIGRATED, acc
    assert acc.messages_copied > 0
    # native login now (the sql passdb), with the same password; the log never carries it
    assert _authenticate_plain(host, imap, zoe["login"], zoe["password"]) == "OK"
    logs = "".join(p.read_text(errors="replace") for p in Path(lab["logs"]).glob("*.log"))
    assert zoe["password"] not in logs and base64.b64encode(zoe["password"].encode()).decode() not in logs
