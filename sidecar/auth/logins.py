"""Login name -> account address, by the rules of the [mail] config section. Pure.

    bare name            user         -> user@DEFAULT   (mail.default_domain, else mail.domains[0])
    address, our domain  user@ours    -> user@ours      (kept; the domain is always folded to lower case)
    Windows realm        DOMAIN\\user  -> user@DEFAULT   (only with mail.strip_realm)
    Kerberos-style realm user@REALM   -> user@DEFAULT   (only with mail.strip_realm; REALM not ours)
    mail.lowercase       folds the local part too.

Anything that cannot name one of our accounts raises InvalidLogin: empty, control characters, whitespace,
a realm while strip_realm is off, no default domain for a bare name.
"""

from __future__ import annotations

from sidecar.config import Config


class InvalidLogin(ValueError):
    """The login name cannot belong to an account here (the message names the reason, not the login)."""


MAX_LOGIN = 512


def _has_control(s: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F or 0x80 <= ord(c) < 0xA0 for c in s)


def account_address(login: str, cfg: Config) -> str:
    """The account address a login name belongs to."""
    if not login:
        raise InvalidLogin("empty login")
    if len(login) > MAX_LOGIN:
        raise InvalidLogin("login too long")
    if _has_control(login):
        raise InvalidLogin("login contains control characters")
    if any(c.isspace() for c in login):
        raise InvalidLogin("login contains white space")
    mail = cfg.mail
    domains = {d.lower() for d in mail.domains}
    default = cfg.default_domain().lower()
    name = login.lower() if mail.lowercase else login

    if "\\" in name:
        if not mail.strip_realm:
            raise InvalidLogin("DOMAIN\\user login while mail.strip_realm is off")
        name = name.rpartition("\\")[2]
        if not name:
            raise InvalidLogin("empty user after the realm")

    local, at, domain = name.rpartition("@")
    if at:
        if not local or not domain:
            raise InvalidLogin("empty local part or domain")
        if domain.lower() in domains:
            return f"{local}@{domain.lower()}"
        if not mail.strip_realm:
            raise InvalidLogin("domain is not one of mail.domains")
        name = local
        if "@" in name:
            raise InvalidLogin("more than one '@'")

    if not default:
        raise InvalidLogin("bare login name and no mail.default_domain or mail.domains")
    return f"{name}@{default}"
