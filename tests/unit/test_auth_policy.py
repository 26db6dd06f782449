"""The pass-through decision, with a fake store and a fake legacy verifier (pure logic)."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
from harness.fakes import FakeStore

from sidecar.auth.passwords import hash_password, verify_password
from sidecar.auth.policy import POSITIVE_TTL, AuthPolicy, CredentialCache
from sidecar.config import Config, HashConfig, LegacyConfig, LimitsConfig, MailConfig, TargetConfig
from sidecar.legacy.verify import LegacyAuthError, LegacyUnavailable
from sidecar.states import State
from sidecar.store.base import ImportedUser, Store, StoreUnavailable
from sidecar.wire.authproto import FAIL, OK, TEMP, Request


class FakeVerifier:
    def __init__(self, passwords: dict[str, str]) -> None:
        self.passwords = passwords
        self.calls: list[tuple[str, str]] = []
        self.unavailable = False
        self.delay = 0.0

    def verify(self, login: str, password: str, *, client_ip: str = "") -> str:
        self.calls.append((login, client_ip))
        if self.delay:
            time.sleep(self.delay)
        if self.unavailable:
            raise LegacyUnavailable("connection refused")
        if self.passwords.get(login) != password:
            raise LegacyAuthError("imap", "[AUTHENTICATIONFAILED] Authentication failed.")
        return "imap"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    *, legacy: LegacyConfig | None = None, limits: LimitsConfig | None = None, **kw: Any
) -> tuple[AuthPolicy, FakeStore, FakeVerifier, Clock]:
    cfg = Config(
        legacy=legacy or LegacyConfig(host="192.0.2.10", imap_port=143, pop3_port=995, pop3_tls="implicit"),
        mail=MailConfig(domains=["example.org"]),
        target=TargetConfig(mail_uid=5000, mail_gid=5001),
        limits=limits or LimitsConfig(),
    )
    store = FakeStore()
    verifier = FakeVerifier({"alice@example.org": "right-pw", "bob@example.org": "bob-pw"})
    clock = Clock()
    policy = AuthPolicy(
        cfg, cast(Store, store), verifier, clock=clock, hasher=kw.pop("hasher", lambda p: "{PLAIN}" + p), **kw
    )
    return policy, store, verifier, clock


def req(
    user: str = "alice",
    password: str = "right-pw",  # noqa: S107  (a test password)
    service: str = "imap",
    ip: str = "198.51.100.7",
) -> Request:
    return Request(user, password, service, ip, "192.0.2.1")


def test_first_login_creates_account_job_hash_and_proxy_fields() -> None:
    policy, store, verifier, _ = make()
    reply = policy.decide(req())
    assert reply.status == OK
    assert reply.fields == {
        "user": "alice@example.org",
        "proxy": "y",
        "host": "192.0.2.10",
        "port": "143",
        "starttls": "yes",
        "proxy_timeout": "10",
        "destuser": "alice@example.org",
        "pass": "right-pw",
        "userdb_uid": "5000",
        "userdb_gid": "5001",
    }
    assert store.states == {"alice@example.org": State.COPYING}
    assert store.hashes["alice@example.org"] == "{PLAIN}right-pw"
    assert store.logins == {"alice@example.org": {"alice"}}
    assert store.jobs == {"alice@example.org": 1}
    cred = policy.credentials.get("alice@example.org")
    assert cred is not None and (cred.login, cred.password) == ("alice@example.org", "right-pw")
    assert verifier.calls == [("alice@example.org", "198.51.100.7")]
    assert store.record_calls == 1  # one store call for every write of the first login


def test_real_argon2_hash_is_stored() -> None:
    policy, store, _, _ = make(hasher=None)
    assert policy.decide(req()).status == OK
    assert store.hashes["alice@example.org"].startswith("{ARGON2ID}$argon2id$")
    assert verify_password("right-pw", store.hashes["alice@example.org"])


def test_deferred_hash_is_stored_after_the_answer_in_verification_order() -> None:
    later: list[Callable[[], None]] = []
    policy, store, verifier, clock = make(defer=later.append)
    assert policy.decide(req()).status == OK
    # the answer is out; the account, login and job are written, the hash is not yet
    assert store.states == {"alice@example.org": State.COPYING} and store.jobs == {"alice@example.org": 1}
    assert store.hashes == {} and len(later) == 1
    clock.now += POSITIVE_TTL + 1  # the user changed the password on the legacy server: verified again
    verifier.passwords["alice@example.org"] = "newer-pw"
    assert policy.decide(req(password="newer-pw")).status == OK
    for run in later:
        run()
    assert store.hashes["alice@example.org"] == "{PLAIN}newer-pw"


def test_deferred_hash_store_failure_is_logged_without_the_password(caplog: pytest.LogCaptureFixture) -> None:
    later: list[Callable[[], None]] = []
    policy, store, _, _ = make(defer=later.append)
    assert policy.decide(req()).status == OK

    def down(address: str, password_hash: str) -> None:
        raise StoreUnavailable("database is locked")

    store.set_password_hash = down  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="sidecar.auth"):
        later[0]()
    assert "storing the hash of alice@example.org failed" in caplog.text
    assert "right-pw" not in caplog.text
    assert store.states == {"alice@example.org": State.COPYING}


def test_pop3_implicit_tls_and_any_cert_when_not_verifying() -> None:
    legacy = LegacyConfig(host="192.0.2.10", pop3_port=995, pop3_tls="implicit", tls_verify=False)
    policy, *_ = make(legacy=legacy)
    fields = policy.decide(req(service="pop3")).fields
    assert (fields["port"], fields["ssl"]) == ("995", "any-cert")
    assert "starttls" not in fields


def test_tls_server_name_goes_to_host_and_the_address_to_hostip() -> None:
    legacy = LegacyConfig(host="192.0.2.10", imap_tls="implicit", imap_port=993, tls_server_name="mail.example.org")
    policy, *_ = make(legacy=legacy)
    fields = policy.decide(req()).fields
    assert (fields["host"], fields["hostip"], fields["ssl"]) == ("mail.example.org", "192.0.2.10", "yes")


def test_smtp_gets_a_plain_ok_and_still_starts_the_migration() -> None:
    policy, store, _, _ = make()
    reply = policy.decide(req(service="smtp"))
    assert reply.status == OK
    assert "proxy" not in reply.fields and "pass" not in reply.fields
    assert store.states["alice@example.org"] is State.COPYING


def test_unknown_service_is_refused_before_asking_legacy() -> None:
    policy, store, verifier, _ = make()
    assert policy.decide(req(service="doveadm")).status == FAIL
    assert verifier.calls == [] and store.states == {}


def test_wrong_password_fails_and_creates_nothing() -> None:
    policy, store, _, _ = make()
    assert policy.decide(req(password="wrong")).status == FAIL
    assert store.states == {} and store.hashes == {} and store.jobs == {}
    assert policy.credentials.get("alice@example.org") is None


@pytest.mark.parametrize("trouble", ["legacy", "store"])
def test_unavailable_is_temporary_and_creates_nothing(trouble: str) -> None:
    policy, store, verifier, _ = make()
    if trouble == "legacy":
        verifier.unavailable = True
    else:
        store.down = True
    assert policy.decide(req()).status == TEMP
    store.down = False
    assert store.states == {} and store.jobs == {}
    assert policy.decide(req(password="wrong")).status == (TEMP if trouble == "legacy" else FAIL)


def test_migrated_account_fails_without_asking_legacy() -> None:
    policy, store, verifier, _ = make()
    store.states["alice@example.org"] = State.MIGRATED
    store.hashes["alice@example.org"] = "{PLAIN}new-pw"  # hashless migrated accounts: tests/test_ops.py
    assert policy.decide(req()).status == FAIL
    assert verifier.calls == []


def test_migrated_account_in_another_spelling_is_checked_against_its_hash_not_legacy() -> None:
    """`CORP\\alice` is not a login row Dovecot's sql passdb finds: checkpassword checks the stored hash (the old
    legacy password no longer works) and answers with user=the account, without proxy fields."""
    policy, store, verifier, _ = make()
    policy.cfg.mail.realms = ["CORP"]
    store.states["alice@example.org"] = State.MIGRATED
    store.hashes["alice@example.org"] = hash_password("new-pw", HashConfig(scheme="SHA512-CRYPT"))
    assert policy.decide(req(user="CORP\\alice")).status == FAIL  # right-pw is the legacy password
    reply = policy.decide(req(user="CORP\\alice", password="new-pw"))
    assert reply.status == OK and reply.fields["user"] == "alice@example.org" and "proxy" not in reply.fields
    assert verifier.calls == []


@pytest.mark.parametrize(
    ("before", "after", "moved"),
    [
        (State.DISCOVERED, State.COPYING, True),
        (State.FAILED, State.COPYING, True),
        (State.COPYING, State.COPYING, False),
    ],
)
def test_existing_accounts(before: State, after: State, moved: bool) -> None:
    policy, store, _, _ = make()
    store.states["alice@example.org"] = before
    store.hashes["alice@example.org"] = "{PLAIN}old-password"
    assert policy.decide(req()).status == OK
    assert store.states["alice@example.org"] is after
    assert bool(store.transitions) is moved
    assert store.hashes["alice@example.org"] == "{PLAIN}right-pw"  # refreshed


def test_no_proxied_session_starts_in_cutover() -> None:
    policy, store, verifier, _ = make()
    store.states["alice@example.org"] = State.CUTOVER
    for service in ("imap", "pop3", "sieve"):
        assert policy.decide(req(service=service)).status == TEMP
    assert verifier.calls == []  # not even asked
    assert policy.decide(req(service="smtp")).status == OK  # SMTP AUTH proxies nothing


def test_a_login_verified_while_the_cutover_began_gets_no_proxy_answer() -> None:
    policy, store, verifier, _ = make()
    store.states["alice@example.org"] = State.COPYING
    verify = verifier.verify

    def slow(login: str, password: str, *, client_ip: str = "") -> str:
        store.states["alice@example.org"] = State.CUTOVER  # the job runner moved on meanwhile
        return verify(login, password, client_ip=client_ip)

    verifier.verify = slow  # type: ignore[method-assign]
    assert policy.decide(req()).status == TEMP


def test_folded_login_is_recorded_and_the_legacy_login_sent_upstream() -> None:
    policy, store, verifier, _ = make()
    reply = policy.decide(req(user="Bob", password="bob-pw"))
    assert reply.status == OK and reply.fields["destuser"] == "bob@example.org"
    assert reply.fields["user"] == "bob@example.org"
    assert store.logins == {"bob@example.org": {"bob"}}
    assert verifier.calls[0][0] == "bob@example.org"


def test_invalid_login_fails_without_asking_legacy() -> None:
    policy, _, verifier, _ = make()
    assert policy.decide(req(user="alice\r\nA2 LOGOUT")).status == FAIL
    assert verifier.calls == []


def test_negative_cache_answers_repeats_locally_until_ttl() -> None:
    policy, _, verifier, clock = make(limits=LimitsConfig(negative_cache_ttl=60))
    for _ in range(5):
        assert policy.decide(req(password="wrong")).status == FAIL
    assert len(verifier.calls) == 1
    assert policy.decide(req()).status == OK  # the right password is not affected
    clock.now += 61
    assert policy.decide(req(password="wrong")).status == FAIL
    assert len(verifier.calls) == 3


def test_account_failure_budget_is_per_client_address() -> None:
    limits = LimitsConfig(auth_failures_per_account=3, auth_failure_window=600, negative_cache_ttl=0)
    policy, _, verifier, clock = make(limits=limits)
    for i in range(3):
        assert policy.decide(req(password=f"guess{i}", ip="203.0.113.9")).status == FAIL
    assert len(verifier.calls) == 3
    assert policy.decide(req(ip="203.0.113.9")).status == FAIL  # that client's budget is spent
    assert len(verifier.calls) == 3
    # the attacker's guesses never turn the real user's right password into "wrong password"
    assert policy.decide(req(ip="198.51.100.7")).status == OK
    clock.now += 601
    assert policy.decide(req(ip="203.0.113.9")).status == OK


def test_guesses_from_many_clients_give_the_user_temp_at_worst() -> None:
    limits = LimitsConfig(
        auth_failures_per_account=3, auth_failures_per_account_total=6, auth_failures_per_client=1000,
        negative_cache_ttl=0,
    )
    policy, _, verifier, _ = make(limits=limits)
    for i in range(6):
        assert policy.decide(req(password=f"guess{i}", ip=f"203.0.113.{i}")).status == FAIL
    assert policy.decide(req(ip="198.51.100.7")).status == TEMP  # never FAIL for the right password
    assert len(verifier.calls) == 6


def test_client_failure_budget() -> None:
    limits = LimitsConfig(auth_failures_per_client=2, auth_failures_per_account=100, negative_cache_ttl=0)
    policy, _, verifier, _ = make(limits=limits)
    for user in ("u1", "u2"):
        assert policy.decide(req(user=user, password="x", ip="203.0.113.5")).status == FAIL
    assert policy.decide(req(ip="203.0.113.5")).status == FAIL
    assert len(verifier.calls) == 2
    assert policy.decide(req(ip="203.0.113.6")).status == OK  # another client is fine


def test_concurrency_bound_answers_temp_when_busy() -> None:
    policy, _, verifier, _ = make(limits=LimitsConfig(auth_concurrency=1), busy_wait=0.05)
    verifier.delay = 0.5
    results: list[str] = []
    t = threading.Thread(target=lambda: results.append(policy.decide(req()).status))
    t.start()
    time.sleep(0.1)
    assert policy.decide(req(user="Bob", password="bob-pw")).status == TEMP
    t.join()
    assert results == [OK]


def test_concurrent_first_logins_make_one_account_and_one_job() -> None:
    policy, store, verifier, _ = make(limits=LimitsConfig(auth_concurrency=8))
    verifier.delay = 0.02
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(policy.decide(req()).status)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [OK] * 8
    assert store.transitions == [("alice@example.org", None, State.COPYING)]
    assert store.jobs == {"alice@example.org": 1}


def test_decision_is_logged_without_the_password(caplog: pytest.LogCaptureFixture) -> None:
    policy, *_ = make()
    with caplog.at_level("INFO", logger="sidecar.auth"):
        policy.decide(req(password="right-pw"))
        policy.decide(req(password="wrong-pw-xyz"))
    lines = [r.getMessage() for r in caplog.records if r.name == "sidecar.auth"]
    assert any("auth ok account=alice@example.org" in m and "client=198.51.100.7" in m for m in lines)
    assert any("legacy-no" in m and "status=FAIL" in m and "duration_ms=" in m for m in lines)
    assert "right-pw" not in caplog.text and "wrong-pw-xyz" not in caplog.text


def test_credential_cache_expires() -> None:
    clock = Clock()
    cache = CredentialCache(ttl=10, clock=clock)
    cache.put("a@example.org", "a", "pw")
    assert cache.get("a@example.org") is not None
    assert "pw" not in repr(cache.get("a@example.org"))
    clock.now += 11
    assert cache.get("a@example.org") is None and len(cache) == 0


def test_positive_cache_answers_repeats_without_a_legacy_check_or_rehash() -> None:
    hashes: list[str] = []
    policy, _store, verifier, clock = make(hasher=lambda p: hashes.append(p) or "{PLAIN}" + p)
    assert policy.decide(req()).status == OK
    assert policy.decide(req(ip="198.51.100.8")).status == OK
    assert len(verifier.calls) == 1 and len(hashes) == 1
    assert policy.decide(req(password="other")).status == FAIL  # a different password is checked
    assert len(verifier.calls) == 2
    clock.now += 301  # past POSITIVE_TTL: checked again
    assert policy.decide(req()).status == OK
    assert len(verifier.calls) == 3


def test_positive_cache_never_masks_migration() -> None:
    policy, store, verifier, _ = make()
    assert policy.decide(req()).status == OK
    store.states["alice@example.org"] = State.MIGRATED
    store.hashes["alice@example.org"] = "{PLAIN}right-pw"  # a scheme the local check does not take
    assert policy.decide(req()).status == FAIL  # never proxy fields from the positive cache
    assert len(verifier.calls) == 1


def test_concurrent_wrong_passwords_respect_the_account_budget() -> None:
    limits = LimitsConfig(auth_failures_per_account=3, auth_failures_per_client=1000, negative_cache_ttl=0)
    policy, _, verifier, _ = make(limits=limits)
    verifier.delay = 0.05
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: policy.decide(req(password=f"bad-{i}")).status, range(20)))
    assert set(answers) == {FAIL}
    assert len(verifier.calls) == 3  # the budget is checked again once the account's earlier check is done


def test_a_check_that_timed_out_after_the_credentials_counts_against_the_budget() -> None:
    limits = LimitsConfig(auth_failures_per_account=2, negative_cache_ttl=0)
    policy, _, verifier, _ = make(limits=limits)

    def slow(login: str, password: str, *, client_ip: str = "") -> str:
        verifier.calls.append((login, client_ip))
        raise LegacyUnavailable("IMAP: The read operation timed out", spent=True)

    policy.verifier = type("V", (), {"verify": staticmethod(slow)})()
    assert [policy.decide(req()).status for _ in range(4)] == [TEMP, TEMP, FAIL, FAIL]
    assert len(verifier.calls) == 2


ATTACKS = [
    "alice@other.example", "OTHER\\alice", "alice@example.org*admin", "bob@example.org.", "alice@v1@example.org",
    "\u212alice@example.org", "ali\u200bce@example.org", "alice@xn--exmple-cua.org", "alice@exämple.org",
]


@pytest.mark.parametrize("login", ATTACKS)
def test_attack_spellings_are_refused_before_anything(login: str) -> None:
    policy, store, verifier, _ = make()
    assert policy.decide(req(user=login)).status == FAIL
    assert verifier.calls == [] and store.states == {} and store.hashes == {} and store.logins == {}
    assert len(policy.credentials) == 0


def test_imported_login_checks_and_stores_one_identity() -> None:
    policy, store, verifier, _ = make()
    policy.cfg.mail.realms = ["CORP"]
    store.imported.append(ImportedUser("jsmith", "john.smith@example.org", ("sales@example.org",)))
    verifier.passwords["jsmith"] = "js-pw"
    for typed in ("jsmith", "CORP\\jsmith", "John.Smith@example.org", "sales@example.org"):
        reply = policy.decide(req(user=typed, password="js-pw"))
        assert reply.status == OK, typed
        assert reply.fields["destuser"] == "jsmith" and reply.fields["user"] == "john.smith@example.org"
        policy.positive.discard("john.smith@example.org")
    assert {c[0] for c in verifier.calls} == {"jsmith"}
    assert set(store.states) == {"john.smith@example.org"} and set(store.hashes) == {"john.smith@example.org"}
    cred = policy.credentials.get("john.smith@example.org")
    assert cred is not None and cred.login == "jsmith"
