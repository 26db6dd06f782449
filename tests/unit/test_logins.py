"""Login name -> account address, by the [mail] rules."""

from __future__ import annotations

import pytest

from sidecar.auth.logins import InvalidLogin, account_address
from sidecar.config import Config, MailConfig


def cfg(**mail: object) -> Config:
    base: dict[str, object] = {"domains": ["example.org", "Example.NET"]}
    base.update(mail)
    return Config(mail=MailConfig(**base))  # type: ignore[arg-type]


# name, login, mail overrides, expected address (or InvalidLogin)
CASES: list[tuple[str, str, dict[str, object], str | None]] = [
    ("bare name gets the first domain", "alice", {}, "alice@example.org"),
    ("bare name gets default_domain", "alice", {"default_domain": "example.net"}, "alice@example.net"),
    ("address in our domain kept", "bob@example.net", {}, "bob@example.net"),
    ("our domain matched case-insensitively", "bob@EXAMPLE.net", {"lowercase": False}, "bob@example.net"),
    ("lowercase folds local part", "Alice.Smith@Example.org", {}, "alice.smith@example.org"),
    ("lowercase off keeps local part", "Alice@example.org", {"lowercase": False}, "Alice@example.org"),
    ("windows realm stripped", "CORP\\alice", {}, "alice@example.org"),
    ("kerberos realm stripped", "alice@CORP.LOCAL", {}, "alice@example.org"),
    ("both realms stripped", "CORP\\alice@CORP.LOCAL", {}, "alice@example.org"),
    ("realm kept off: windows refused", "CORP\\alice", {"strip_realm": False}, None),
    ("realm kept off: foreign domain refused", "alice@other.com", {"strip_realm": False}, None),
    ("realm kept off: our domain still fine", "alice@example.org", {"strip_realm": False}, "alice@example.org"),
    ("no domains configured", "alice", {"domains": []}, None),
    ("empty", "", {}, None),
    ("CR LF injection", "alice\r\nA1 LOGOUT", {}, None),
    ("NUL", "ali\0ce", {}, None),
    ("TAB", "ali\tce", {}, None),
    ("DEL", "ali\x7fce", {}, None),
    ("space", "alice smith", {}, None),
    ("empty after realm", "CORP\\", {}, None),
    ("empty local part", "@example.org", {}, None),
    ("empty domain", "alice@", {}, None),
    ("two at-signs, foreign", "a@b@other.com", {}, None),
    ("too long", "a" * 513, {}, None),
    ("utf-8 name", "Jörg", {}, "jörg@example.org"),
]


@pytest.mark.parametrize(("name", "login", "mail", "expected"), CASES, ids=[c[0] for c in CASES])
def test_account_address(name: str, login: str, mail: dict[str, object], expected: str | None) -> None:
    if expected is None:
        with pytest.raises(InvalidLogin):
            account_address(login, cfg(**mail))
    else:
        assert account_address(login, cfg(**mail)) == expected


def test_error_message_does_not_echo_the_login() -> None:
    with pytest.raises(InvalidLogin) as e:
        account_address("secret-name\n", cfg())
    assert "secret-name" not in str(e.value)
