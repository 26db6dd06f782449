"""Login name -> (account address, legacy login): every spelling of issue 14, table-driven."""

from __future__ import annotations

import pytest

from sidecar.auth.logins import InvalidLogin, MappedUser, account_address, legacy_login, resolve
from sidecar.config import Config, LegacyConfig, MailConfig

JSMITH = MappedUser("jsmith", "john.smith@example.org", ("sales@example.org",))


def lookup(key: str) -> MappedUser | None:
    if key in (JSMITH.login, JSMITH.address, *JSMITH.addresses):
        return JSMITH
    return None


def cfg(template: str = "%u", **mail: object) -> Config:
    base: dict[str, object] = {"domains": ["example.org", "Example.NET"], "realms": ["CORP", "corp.local"]}
    base.update(mail)
    return Config(mail=MailConfig(**base), legacy=LegacyConfig(login_template=template))  # type: ignore[arg-type]


# name, typed login, mail overrides, expected (address, legacy login) or None (refused)
CASES: list[tuple[str, str, dict[str, object], tuple[str, str] | None]] = [
    ("bare name gets the first domain", "alice", {}, ("alice@example.org", "alice@example.org")),
    ("bare name gets default_domain", "alice", {"default_domain": "example.net"},
     ("alice@example.net", "alice@example.net")),
    ("address in our domain kept", "bob@example.net", {}, ("bob@example.net", "bob@example.net")),
    ("our domain matched case-insensitively", "bob@EXAMPLE.net", {"lowercase": False},
     ("bob@example.net", "bob@example.net")),
    ("lowercase folds local part", "Alice.Smith@Example.org", {}, ("alice.smith@example.org",) * 2),
    ("lowercase off keeps local part", "Alice@example.org", {"lowercase": False}, ("Alice@example.org",) * 2),
    ("windows realm in allow-list", "CORP\\alice", {}, ("alice@example.org",) * 2),
    ("windows realm, other case", "corp\\alice", {}, ("alice@example.org",) * 2),
    ("kerberos realm in allow-list", "alice@CORP.LOCAL", {}, ("alice@example.org",) * 2),
    # the attacks of issue 14
    ("foreign domain is not a realm", "alice@other.example", {}, None),
    ("foreign windows realm", "OTHER\\alice", {}, None),
    ("master separator", "alice@example.org*admin", {}, None),
    ("master separator, bare", "alice*admin", {}, None),
    ("trailing dot", "bob@example.org.", {}, None),
    ("leading dot domain", "bob@.example.org", {}, None),
    ("empty label", "bob@example..org", {}, None),
    ("two at-signs in our domain", "alice@v1@example.org", {}, None),
    ("two at-signs, foreign", "a@b@other.com", {}, None),
    ("kelvin sign (NFKC: K)", "\u212aate@example.org", {}, None),
    ("full-width letters", "\uff41lice@example.org", {}, None),
    ("ligature", "\ufb01nn@example.org", {}, None),
    ("decomposed accent", "jo\u0301rg@example.org", {}, None),
    ("zero-width space", "ali\u200bce@example.org", {}, None),
    ("zero-width joiner", "alice\u200d@example.org", {}, None),
    ("bidi override", "\u202ealice@example.org", {}, None),
    ("soft hyphen", "ali\u00adce", {}, None),
    ("BOM", "\ufeffalice", {}, None),
    ("no-break space", "alice\u00a0", {}, None),
    ("IDNA U-label domain", "bob@exämple.org", {}, None),
    ("IDNA A-label not served", "bob@xn--exmple-cua.org", {}, None),
    ("IDNA A-label served", "bob@xn--exmple-cua.org", {"domains": ["xn--exmple-cua.org"]},
     ("bob@xn--exmple-cua.org",) * 2),
    ("two backslashes", "CORP\\X\\alice", {}, None),
    ("realm then address", "CORP\\alice@example.org", {}, None),
    ("empty after realm", "CORP\\", {}, None),
    ("slash in local part", "a/b@example.org", {}, None),
    ("dot-dot local part", "a..b", {}, None),
    ("leading dot local part", ".alice", {}, None),
    ("no domains configured", "alice", {"domains": []}, None),
    ("empty", "", {}, None),
    ("CR LF injection", "alice\r\nA1 LOGOUT", {}, None),
    ("NUL", "ali\0ce", {}, None),
    ("TAB", "ali\tce", {}, None),
    ("DEL", "ali\x7fce", {}, None),
    ("C1 control", "ali\x85ce", {}, None),
    ("line separator", "ali\u2028ce", {}, None),
    ("space", "alice smith", {}, None),
    ("empty local part", "@example.org", {}, None),
    ("empty domain", "alice@", {}, None),
    ("too long", "a" * 513, {}, None),
    ("utf-8 name (NFC)", "Jörg", {}, ("jörg@example.org",) * 2),
    # the login map
    ("imported login", "jsmith", {}, ("john.smith@example.org", "jsmith")),
    ("imported login, realm", "CORP\\JSmith", {}, ("john.smith@example.org", "jsmith")),
    ("imported login, kerberos realm", "jsmith@corp.local", {}, ("john.smith@example.org", "jsmith")),
    ("imported address", "John.Smith@example.org", {}, ("john.smith@example.org", "jsmith")),
    ("imported extra address", "sales@example.org", {}, ("john.smith@example.org", "jsmith")),
    ("login@ours where login is another account's", "jsmith@example.org", {}, None),
]


@pytest.mark.parametrize(("name", "login", "mail", "expected"), CASES, ids=[c[0] for c in CASES])
def test_resolve(name: str, login: str, mail: dict[str, object], expected: tuple[str, str] | None) -> None:
    if expected is None:
        with pytest.raises(InvalidLogin):
            resolve(login, cfg(**mail), lookup)
    else:
        ident = resolve(login, cfg(**mail), lookup)
        assert (ident.address, ident.legacy_login) == expected
        assert account_address(login, cfg(**mail), lookup) == expected[0]


@pytest.mark.parametrize(
    ("template", "typed", "expected"),
    [
        ("%u", "alice", "alice@example.org"),
        ("%n", "alice@example.org", "alice"),
        ("%n@%d", "CORP\\alice", "alice@example.org"),
        ("CORP\\%n", "alice", "CORP\\alice"),
        ("%n", "jsmith@corp.local", "jsmith"),
        ("%n@%d", "sales@example.org", "jsmith@example.org"),
        ("100%%-%n", "alice", "100%-alice"),
    ],
)
def test_legacy_login_template(template: str, typed: str, expected: str) -> None:
    assert resolve(typed, cfg(template), lookup).legacy_login == expected


def test_unknown_template_variable() -> None:
    with pytest.raises(InvalidLogin):
        legacy_login("%x", "a@b", "a@b")


def test_every_accepted_spelling_checks_the_account_it_stores() -> None:
    """Whatever is typed, the legacy login is a function of the account alone: two spellings of one account
    are checked as the same legacy login, so a password can never be verified for one and stored for another."""
    seen: dict[str, str] = {}
    for _name, login, mail, expected in CASES:
        if expected is None or mail:
            continue
        ident = resolve(login, cfg(), lookup)
        assert seen.setdefault(ident.address, ident.legacy_login) == ident.legacy_login


def test_error_message_does_not_echo_the_login() -> None:
    for bad in ("secret-name\n", "secret@other.example", "secret\u200b"):
        with pytest.raises(InvalidLogin) as e:
            resolve(bad, cfg())
        assert "secret" not in str(e.value)
