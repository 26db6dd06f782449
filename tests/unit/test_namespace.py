"""The target namespace: explicit [mail] keys, else the legacy server's NAMESPACE, else Dovecot's usual one."""

from __future__ import annotations

import pytest

from sidecar import config
from sidecar.legacy.namespace import DEFAULT, Namespace, resolve


def _cfg(prefix: str = "auto", sep: str = "auto") -> config.Config:
    return config.from_dict({"mail": {"namespace_prefix": prefix, "namespace_separator": sep}})


@pytest.mark.parametrize(
    ("prefix", "sep", "legacy", "want"),
    [
        ("auto", "auto", ("INBOX.", "."), ("INBOX.", ".")),  # Cyrus, Courier
        ("auto", "auto", ("", "/"), ("", "/")),  # Dovecot, Exchange
        ("auto", "auto", None, DEFAULT),  # not asked: Dovecot's usual
        ("auto", "/", ("INBOX.", "."), ("INBOX/", "/")),  # the legacy prefix with the separator chosen here
        ("", "/", ("INBOX.", "."), ("", "/")),  # explicit wins
        ("auto", "auto", ("", "\\"), ("", "/")),  # a separator Maildir++ cannot show: "/"
        ("auto", "auto", ("Mail\\", "\\"), ("Mail/", "/")),
    ],
)
def test_resolve(prefix: str, sep: str, legacy: tuple[str, str] | None, want: tuple[str, str]) -> None:
    assert resolve(_cfg(prefix, sep), legacy) == Namespace(*want)


def test_names_as_clients_see_them() -> None:
    ns = Namespace("INBOX.", ".")
    assert ns.name("INBOX") == "INBOX"
    assert ns.name("Archive/2023") == "INBOX.Archive.2023"
    assert Namespace("", "/").name("Archive/2023") == "Archive/2023"


@pytest.mark.parametrize(("prefix", "sep"), [("INBOX.", "/"), ("INBOX", "."), ("x", "auto"), ("", ":")])
def test_bad_combinations_are_config_errors(prefix: str, sep: str) -> None:
    with pytest.raises(config.ConfigError, match="namespace"):
        _cfg(prefix, sep)
