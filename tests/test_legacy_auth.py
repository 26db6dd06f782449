"""Verifying passwords on a real legacy server: the lab's legacy Dovecot + Postfix (sidecar/lab/legacy.py).

Wrong-password cases come last in this module: the legacy Dovecot keeps its auth failure delay and penalty (as a
real one would), which slows every later check from our address.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.config import HashConfig, LegacyConfig
from sidecar.lab.legacy import LegacyServer, start_legacy, stop_legacy
from sidecar.lab.proc import free_port
from sidecar.legacy_auth import LegacyAuthError, LegacyUnavailable, LegacyVerifier
from sidecar.passwords import hash_password

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("dovecot") is None or os.geteuid() != 0, reason="needs dovecot and root"),
]

HOST = "127.0.0.23"
ODD_PASSWORD = 'Sé"sa\\me {5} ok'  # quotes, backslash, 8-bit, braces: needs an IMAP literal
QUOTE_PASSWORD = 'a "quoted" \\ pass'  # quotable


@pytest.fixture(scope="module")
def legacy() -> Iterator[LegacyServer]:
    d = Path(tempfile.mkdtemp(prefix="ap-la-", dir="/tmp"))
    os.chmod(d, 0o755)
    srv = start_legacy(d, host=HOST, users=2, messages_per_user=0)
    try:
        users = srv.dir / "users"
        line = users.read_text().splitlines()[0].split(":")
        with users.open("a") as f:  # two extra users with awkward passwords (Dovecot re-reads passwd-files)
            for name, pw in (("odd", ODD_PASSWORD), ("quoter", QUOTE_PASSWORD)):
                stored = hash_password(pw, HashConfig(scheme="SHA512-CRYPT"))
                f.write(":".join([f"{name}@{srv.domain}", stored, *line[2:]]) + "\n")
        yield srv
    finally:
        stop_legacy(d)
        shutil.rmtree(d, ignore_errors=True)


def cfg(srv: LegacyServer, **kw: object) -> LegacyConfig:
    base = LegacyConfig(
        host=srv.host,
        imap_port=srv.imap,
        imap_tls="starttls",
        pop3_port=srv.pop3,
        pop3_tls="starttls",
        submission_port=srv.submission,
        submission_tls="starttls",
        tls_server_name=srv.tls_name,
        ca_file=str(srv.ca_file),
        timeout=20.0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def dead_port() -> int:
    return free_port(HOST)


@pytest.mark.parametrize(
    ("proto", "overrides"),
    [
        ("imap", {"imap_tls": "starttls"}),
        ("imap", {"imap_tls": "none"}),
        ("imap", {"imap_tls": "implicit", "imap_port": "imaps"}),
        ("pop3", {"pop3_tls": "starttls"}),
        ("pop3", {"pop3_tls": "none"}),
        ("pop3", {"pop3_tls": "implicit", "pop3_port": "pop3s"}),
        ("smtp", {"submission_tls": "starttls"}),
        ("smtp", {"submission_tls": "none"}),
    ],
)
def test_right_password_is_accepted(legacy: LegacyServer, proto: str, overrides: dict[str, object]) -> None:
    kw = {k: (getattr(legacy, v) if isinstance(v, str) and k.endswith("_port") else v) for k, v in overrides.items()}
    user = legacy.users[0]
    verifier = LegacyVerifier(cfg(legacy, verify_with=[proto], **kw))
    assert verifier.verify(user.login, user.password, client_ip="198.51.100.7") == proto


@pytest.mark.parametrize("proto", ["imap", "pop3", "smtp"])
@pytest.mark.parametrize("name", ["odd", "quoter"])
def test_awkward_passwords_reach_the_server_intact(legacy: LegacyServer, proto: str, name: str) -> None:
    password = ODD_PASSWORD if name == "odd" else QUOTE_PASSWORD
    verifier = LegacyVerifier(cfg(legacy, verify_with=[proto]))
    assert verifier.verify(f"{name}@{legacy.domain}", password) == proto


def test_unavailable_protocol_moves_to_the_next(legacy: LegacyServer) -> None:
    user = legacy.users[0]
    verifier = LegacyVerifier(cfg(legacy, imap_port=dead_port(), verify_with=["imap", "pop3"]))
    assert verifier.verify(user.login, user.password) == "pop3"


def test_everything_down_is_unavailable(legacy: LegacyServer) -> None:
    user = legacy.users[0]
    verifier = LegacyVerifier(cfg(legacy, imap_port=dead_port(), pop3_port=dead_port(), submission_port=0, timeout=2.0))
    with pytest.raises(LegacyUnavailable) as e:
        verifier.verify(user.login, user.password)
    assert user.password not in str(e.value)


def test_wrong_certificate_name_is_unavailable(legacy: LegacyServer) -> None:
    user = legacy.users[0]
    for proto in ("imap", "pop3", "smtp"):
        verifier = LegacyVerifier(cfg(legacy, tls_server_name="wrong.example", verify_with=[proto]))
        with pytest.raises(LegacyUnavailable, match=r"(?i)certificate|hostname"):
            verifier.verify(user.login, user.password)


def test_unknown_ca_is_unavailable_unless_verification_is_off(legacy: LegacyServer) -> None:
    user = legacy.users[0]
    with pytest.raises(LegacyUnavailable):
        LegacyVerifier(cfg(legacy, ca_file="", verify_with=["imap"])).verify(user.login, user.password)
    relaxed = LegacyVerifier(cfg(legacy, ca_file="", tls_verify=False, verify_with=["imap"]))
    assert relaxed.verify(user.login, user.password) == "imap"


def test_xclient_passes_the_client_address(legacy: LegacyServer) -> None:
    user = legacy.users[0]
    verifier = LegacyVerifier(cfg(legacy, verify_with=["smtp"]))
    assert verifier.verify(user.login, user.password, client_ip="198.51.100.77") == "smtp"
    log = legacy.logs.get("legacy-postfix")
    if log is None or not log.exists():
        pytest.skip("legacy Postfix log not found")
    deadline = time.monotonic() + 5
    while "198.51.100.77" not in log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "198.51.100.77" in log.read_text(errors="replace")


@pytest.mark.parametrize("login", ["alice\r\nA1 LOGOUT", "alice\0", "ali\x1bce", ""])
def test_control_characters_are_refused_before_connecting(login: str) -> None:
    # port 9 on a dead address: any connection attempt would be "unavailable", not a "no"
    verifier = LegacyVerifier(LegacyConfig(host="127.0.0.1", imap_port=dead_port(), timeout=1.0))
    with pytest.raises(LegacyAuthError, match="precheck"):
        verifier.verify(login, "whatever")


# --- wrong passwords last (the legacy server's auth penalty) -----------------------------------------------


@pytest.mark.parametrize("proto", ["imap", "pop3", "smtp"])
def test_wrong_password_is_a_definite_no(legacy: LegacyServer, proto: str) -> None:
    user = legacy.users[1]
    verifier = LegacyVerifier(cfg(legacy, verify_with=[proto]))
    with pytest.raises(LegacyAuthError) as e:
        verifier.verify(user.login, "not-the-password-42")
    assert e.value.protocol == proto
    assert "not-the-password-42" not in str(e.value)


def test_a_no_from_the_first_protocol_is_final(legacy: LegacyServer) -> None:
    user = legacy.users[1]
    verifier = LegacyVerifier(cfg(legacy, verify_with=["imap", "pop3", "smtp"]))
    with pytest.raises(LegacyAuthError) as e:
        verifier.verify("nosuchuser@" + legacy.domain, "x-password")
    assert e.value.protocol == "imap"
    assert user  # the server is still up for the other tests
