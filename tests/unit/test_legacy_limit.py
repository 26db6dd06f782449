"""The node's cap toward the legacy server (sidecar/legacy/limit.py): connections, the share kept for logins, the
byte rate and its hours; the password check under the cap against a recording fake legacy server. The cap seen
from the legacy server's side, with the real copier and real logins: tests/e2e/test_legacy_limits_e2e.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.fake_legacy import FakeLegacy

from sidecar import config
from sidecar.legacy import limit
from sidecar.legacy.limit import BURST, LegacyBusy, LegacyLimiter, parse_hours
from sidecar.legacy.verify import LegacyUnavailable, LegacyVerifier


@pytest.fixture
def fake() -> Iterator[FakeLegacy]:
    f = FakeLegacy(accept="pw", delay=0.2)
    yield f
    f.close()


def test_copies_leave_the_login_share_free_and_logins_may_use_everything() -> None:
    lim = LegacyLimiter(4, 1)
    copies = [lim.acquire(kind, 0) for kind in ("imap", "pop3", "sieve")]
    with pytest.raises(LegacyBusy, match="legacy_connections"):
        lim.acquire("imap", 0)  # the fourth is kept for password checks
    login = lim.acquire("login", 0)
    with pytest.raises(LegacyBusy):
        lim.acquire("login", 0)  # all four in use
    assert lim.in_use() == {"login": 1, "imap": 1, "pop3": 1, "sieve": 1} and lim.peak == 4
    copies[0].release()
    copies[0].release()  # a second release is harmless
    second = lim.acquire("login", 0)  # a check may take a copy's place
    login.release(), second.release()
    assert lim.busy == {"login": 1, "imap": 1, "pop3": 0, "sieve": 0}


def test_the_login_share_defaults_to_half_and_a_waiting_copy_gets_the_next_free_place() -> None:
    lim = LegacyLimiter(4)
    held = [lim.acquire("imap", 0), lim.acquire("imap", 0)]
    with pytest.raises(LegacyBusy):
        lim.acquire("imap", 0)
    got: list[float] = []
    t = threading.Thread(target=lambda: got.append(time.monotonic()) if lim.acquire("imap", 5) else None)
    t.start()
    time.sleep(0.2)
    assert not got  # still waiting
    freed = time.monotonic()
    held[0].release()
    t.join(5)
    assert got and got[0] - freed < 1.0


def test_a_waiting_check_goes_before_a_waiting_copy() -> None:
    """Both wait for the same full cap; the place that comes free goes to the check, and the copy waits on
    (it gets the next one, once no check waits)."""
    lim = LegacyLimiter(4, 2)
    copies = [lim.acquire("imap", 0), lim.acquire("imap", 0)]
    logins = [lim.acquire("login", 0), lim.acquire("login", 0)]
    order: list[str] = []
    done = threading.Event()

    def take(kind: str, wait: float) -> None:
        permit = lim.acquire(kind, wait)
        order.append(kind)
        if kind == "login":
            done.wait(5)
        permit.release()

    copy = threading.Thread(target=take, args=("imap", 10))
    copy.start()
    time.sleep(0.1)  # the copy waits first
    check = threading.Thread(target=take, args=("login", 10))
    check.start()
    time.sleep(0.1)
    copies[0].release()  # one place, within the copies' share: without the priority the copy would take it
    time.sleep(0.3)
    assert order == ["login"]
    done.set()
    copy.join(5), check.join(5)
    assert order == ["login", "imap"]
    copies[1].release(), logins[0].release(), logins[1].release()


def test_a_check_that_gives_up_lets_the_copies_go_on() -> None:
    lim = LegacyLimiter(2, 1)
    held = [lim.acquire("imap", 0), lim.acquire("login", 0)]
    with pytest.raises(LegacyBusy):
        lim.acquire("login", 0.2)
    held[0].release()
    assert lim.acquire("imap", 0)  # no check waits any more
    held[1].release()


def test_ready_connections_take_only_the_login_share() -> None:
    lim = LegacyLimiter(4, 2)
    ready = [lim.acquire("login", 0, ready=True) for _ in range(2)]
    with pytest.raises(LegacyBusy):
        lim.acquire("login", 0, ready=True)  # a third idle one would eat into the copies' share
    assert lim.acquire("imap", 0) and lim.acquire("imap", 0)  # copies still get theirs
    ready[0].release()


def test_no_cap_and_a_cap_of_one() -> None:
    free = LegacyLimiter(0)
    assert [free.acquire("imap", 0) for _ in range(50)]
    one = LegacyLimiter(1)  # nothing to split: logins and copies share it
    p = one.acquire("imap", 0)
    with pytest.raises(LegacyBusy):
        one.acquire("login", 0)
    p.release()
    assert one.acquire("login", 0)


def test_close_wakes_the_waiting() -> None:
    lim = LegacyLimiter(2)
    lim.acquire("imap", 0)
    errors: list[Exception] = []

    def wait() -> None:
        try:
            lim.acquire("imap", 30)
        except LegacyBusy as e:
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.1)
    lim.close()
    t.join(5)
    assert not t.is_alive() and errors


def test_the_byte_rate_is_a_node_wide_token_bucket() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    lim = LegacyLimiter(bytes_per_second=100_000, clock=lambda: now[0])
    assert lim.throttle(BURST, sleep) == 0.0  # the burst passes at once
    total = sum(lim.throttle(50_000, sleep) for _ in range(20))  # 1 MB more
    assert total == pytest.approx(10.0, rel=0.01) and lim.throttled_seconds == pytest.approx(total)
    now[0] += 60  # idle for a minute: no more than the burst is saved up
    assert lim.throttle(BURST + 100_000, sleep) == pytest.approx(1.0, rel=0.01)
    assert LegacyLimiter(bytes_per_second=0).throttle(10**9, sleep) == 0.0


@pytest.mark.parametrize(
    ("hours", "hour", "applies"),
    [("08-18", 7, False), ("08-18", 8, True), ("08-18", 17, True), ("08-18", 18, False), ("22-06", 23, True),
     ("22-06", 3, True), ("22-06", 6, False), ("22-06", 12, False), ("", 3, True), ("0-24", 23, True)],
)  # fmt: skip
def test_throttle_hours(hours: str, hour: int, applies: bool) -> None:
    lim = LegacyLimiter(bytes_per_second=1000, hours=hours, local_hour=lambda: hour)
    assert lim.throttling() is applies
    assert (lim.throttle(BURST + 1000, lambda s: None) > 0) is applies


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\nlegacy_connections = 4\nlegacy_login_connections = 4\n",
         "key 'limits.legacy_login_connections' (4) must be less than limits.legacy_connections (4)"),
        ("[limits]\nlegacy_connections = 0\nlegacy_login_connections = 2\n",
         "key 'limits.legacy_login_connections' needs limits.legacy_connections"),
        ('[limits]\nthrottle_hours = "daytime"\n', "key 'limits.throttle_hours' must look like 08-18"),
        ('[limits]\nthrottle_hours = "9-9"\n', "key 'limits.throttle_hours' must name two different hours"),
        ('[limits]\nthrottle_hours = "25-3"\n', "key 'limits.throttle_hours' must name two different hours"),
        ("[limits]\nlegacy_bytes_per_second = -1\n", "key 'limits.legacy_bytes_per_second' must not be negative"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key_and_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "autoport.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_parse_hours() -> None:
    assert parse_hours("08-18") == (8, 18) and parse_hours(" ") is None and parse_hours("22-06") == (22, 6)


def test_password_checks_wait_their_turn_under_the_cap(fake: FakeLegacy) -> None:
    lim = LegacyLimiter(2, 1)
    verifier = LegacyVerifier(fake.config(ready_connections=0, verify_with=["imap"]), limiter=lim)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(verifier.verify("u", "pw"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == ["imap"] * 6
    assert lim.peak == 2 and lim.in_use()["login"] == 0  # (each check held the fake's slow greeting 0.2 s)
    assert fake.connections["imap"] == 6


def test_a_check_that_finds_no_connection_is_a_temporary_failure_without_trying_other_protocols(
    fake: FakeLegacy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limit, "LOGIN_WAIT", 0.3)
    lim = LegacyLimiter(2, 1)
    held = [lim.acquire("login", 0), lim.acquire("imap", 0)]
    verifier = LegacyVerifier(fake.config(ready_connections=0), limiter=lim)  # imap, pop3, smtp
    started = time.monotonic()
    with pytest.raises(LegacyUnavailable, match="legacy_connections"):
        verifier.verify("u", "pw")
    assert 0.25 < time.monotonic() - started < 2.0  # one short wait, not one per protocol
    assert fake.connections == {"imap": 0, "pop3": 0, "smtp": 0}
    held[0].release()
    assert verifier.verify("u", "pw") == "imap"
    assert lim.in_use()["login"] == 0


def test_ready_connections_hold_their_place_until_a_check_is_done(fake: FakeLegacy) -> None:
    lim = LegacyLimiter(4, 2)
    verifier = LegacyVerifier(fake.config(ready_connections=2, verify_with=["imap", "pop3"]), limiter=lim)
    try:
        for _ in range(4):
            assert verifier.verify("u", "pw") == "imap"
            deadline = time.monotonic() + 10
            while not verifier.ready_counts().get("imap") and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # (openers still under way finish)
            # idle ready connections hold their places, only within the login share: copies keep theirs
            ready = sum(verifier.ready_counts().values())
            assert 1 <= ready <= 2 and lim.in_use()["login"] == ready
        assert lim.acquire("imap", 0) and lim.acquire("imap", 0)
    finally:
        verifier.close()
    assert lim.in_use()["login"] == 0
