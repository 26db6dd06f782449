"""The copier's IMAP and POP3 logins send a password exactly like the check does (issue 14), on a recording fake
legacy server: non-ASCII, quotes, backslashes, CR/LF arrive byte for byte inside one login command."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness.fake_legacy import FakeLegacy

from sidecar.migration.copier import SourceAuthError, SourceParams  # isort: skip  (imports the copier first)
from sidecar.legacy.imap import LegacySource  # isort: skip
from sidecar.legacy.pop3 import LegacyPop3

PASSWORDS = ["pässwörd-€", 'q"uo\\te\'s', "line\r\nA2 LOGOUT", "plain-ascii"]


@pytest.fixture
def fake() -> Iterator[FakeLegacy]:
    f = FakeLegacy()
    yield f
    f.close()


def params(fake: FakeLegacy, password: str) -> SourceParams:
    return SourceParams(host="127.0.0.1", user="alice@example.org", password=password,
                        imap_port=fake.port("imap"), pop3_port=fake.port("pop3"), timeout=5.0)  # fmt: skip


@pytest.mark.parametrize("password", PASSWORDS, ids=repr)
def test_imap_login_sends_the_password_as_one_element(fake: FakeLegacy, password: str) -> None:
    fake.accept = password
    with LegacySource(params(fake, password)):
        pass
    logins = [c for c in fake.commands["imap"] if c.verb == "LOGIN"]
    assert len(logins) == 1 and logins[0].args == [b"alice@example.org", password.encode()]
    assert {c.verb for c in fake.commands["imap"]} <= {"CAPABILITY", "LOGIN", "LOGOUT"}


def test_imap_refusal_is_an_auth_error_without_the_password(fake: FakeLegacy) -> None:
    fake.accept = "other"
    with pytest.raises(SourceAuthError) as e:
        LegacySource(params(fake, "pässwörd-€")).connect()
    assert "pässw" not in str(e.value)


@pytest.mark.parametrize("password", PASSWORDS, ids=repr)
def test_pop3_login_never_puts_cr_lf_on_a_line(fake: FakeLegacy, password: str) -> None:
    with pytest.raises(SourceAuthError), LegacyPop3(params(fake, password)):  # the fake refuses every login
        pass
    verbs = [c.verb for c in fake.commands["pop3"]]
    assert set(verbs) <= {"CAPA", "USER", "PASS", "AUTH", "QUIT"}
    assert verbs.count("PASS") + verbs.count("AUTH") == 1
