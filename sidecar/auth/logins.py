"""Login name -> (account address, legacy login): the one identity mapping. Pure (no I/O).

Every part of the pass-through login uses the pair this module returns and nothing else: the legacy check
and Dovecot's proxy (`destuser`) use `legacy_login`; the hash, the recorded login, the remembered credentials,
the failure budgets and the copy job use `address`. Whatever a client types, the password is checked on the
legacy server for exactly the account whose hash we store and whose mailbox we copy.

More (the reasons and limits behind this module): docs/modules.md, sidecar/auth/logins.py.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Callable

from sidecar.config import Config
from sidecar.store.base import ImportedUser

MappedUser = ImportedUser  # one row of the login map


class InvalidLogin(ValueError):
    """The login name cannot belong to an account here (the message names the reason, not the login)."""


MAX_LOGIN = 512
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"}


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a typed login means: the account, how the legacy server knows it, and the folded login typed."""

    address: str
    legacy_login: str
    login: str


Lookup = Callable[[str], MappedUser | None]


def _no_lookup(_key: str) -> MappedUser | None:
    return None


def check_chars(text: str, what: str = "login") -> None:
    """The character rules of step 1 (also applied to imported logins and addresses)."""
    if not text:
        raise InvalidLogin(f"empty {what}")
    if len(text) > MAX_LOGIN:
        raise InvalidLogin(f"{what} too long")
    for c in text:
        cat = unicodedata.category(c)
        if cat in _REFUSED_CATEGORIES:
            kind = "white space" if cat[0] == "Z" else "control or format characters"
            raise InvalidLogin(f"{what} contains {kind}")
        if c.isspace():
            raise InvalidLogin(f"{what} contains white space")
    if unicodedata.normalize("NFKC", text) != text:
        raise InvalidLogin(f"{what} is not in Unicode NFKC form")


def _domain(domain: str) -> str:
    if not domain:
        raise InvalidLogin("empty domain")
    if not domain.isascii():
        raise InvalidLogin("non-ASCII domain (use its xn-- form)")
    labels = domain.split(".")
    if any(not label for label in labels):
        raise InvalidLogin("domain with an empty label or a leading/trailing dot")
    return domain.lower()


def _local(local: str) -> None:
    if not local:
        raise InvalidLogin("empty local part")
    if "/" in local or local.startswith(".") or local.endswith(".") or ".." in local:
        raise InvalidLogin("local part with '/', a leading or trailing dot, or '..'")


def fold(login: str, cfg: Config) -> str:
    """Step 1 and 2: the checked, folded login (still with its realm)."""
    check_chars(login)
    sep = cfg.legacy.master_separator
    if sep and sep in login:
        raise InvalidLogin("login contains the master login separator")
    if login.count("\\") > 1:
        raise InvalidLogin("more than one '\\'")
    if login.count("@") > 1:
        raise InvalidLogin("more than one '@'")
    name = login.lower() if cfg.mail.lowercase else login
    if name != login:
        check_chars(name)
    return name


def resolve(login: str, cfg: Config, lookup: Lookup | None = None) -> Identity:
    """The identity a typed login belongs to, or InvalidLogin. `lookup` finds an imported user by login or
    by any of its addresses (store.find_imported); without it there is no login map."""
    find = lookup or _no_lookup
    name = fold(login, cfg)
    mail = cfg.mail
    served = {d.lower() for d in mail.domains}
    realms = {r.lower() for r in mail.realms}

    hit = find(name)
    if hit is not None:
        return _identity(hit.address, hit, name, cfg)

    bare = name
    if "\\" in name:
        realm, _, bare = name.partition("\\")
        if realm.lower() not in realms:
            raise InvalidLogin("DOMAIN\\user with a realm not in mail.realms")
        if not bare or "@" in bare:
            raise InvalidLogin("DOMAIN\\user needs a bare user name after the realm")
    else:
        local, at, domain = name.partition("@")
        if at:
            domain = _domain(domain)
            _local(local)
            if domain in served:
                address = f"{local}@{domain}"
                if address != name:
                    hit = find(address)
                    if hit is not None:
                        return _identity(hit.address, hit, name, cfg)
                other = find(local)
                if other is not None and other.address != address:
                    raise InvalidLogin("ambiguous: the local part is the imported login of another account")
                return _identity(address, None, name, cfg)
            if domain not in realms:
                raise InvalidLogin("domain is neither one of mail.domains nor one of mail.realms")
            bare = local

    if bare != name:
        hit = find(bare)
        if hit is not None:
            return _identity(hit.address, hit, name, cfg)
    _local(bare)
    default = cfg.default_domain().lower()
    if not default:
        raise InvalidLogin("bare login name and no mail.default_domain or mail.domains")
    address = f"{bare}@{default}"
    hit = find(address)
    return _identity(address if hit is None else hit.address, hit, name, cfg)


def _identity(address: str, hit: MappedUser | None, login: str, cfg: Config) -> Identity:
    legacy_name = hit.login if hit is not None else address
    return Identity(address=address, legacy_login=legacy_login(cfg.legacy.login_template, legacy_name, address),
                    login=login)


def legacy_login(template: str, legacy_name: str, address: str) -> str:
    """Expand legacy.login_template (%u, %n, %d, %%) for one account."""
    out: list[str] = []
    i = 0
    while i < len(template):
        c = template[i]
        if c == "%" and i + 1 < len(template):
            v = template[i + 1]
            if v == "u":
                out.append(legacy_name)
            elif v == "n":
                out.append(legacy_name.partition("@")[0])
            elif v == "d":
                out.append(address.rpartition("@")[2])
            elif v == "%":
                out.append("%")
            else:
                raise InvalidLogin(f"legacy.login_template has an unknown variable %{v}")
            i += 2
            continue
        out.append(c)
        i += 1
    result = "".join(out)
    if not result or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in result):
        raise InvalidLogin("legacy login is empty or has control characters")
    return result


def account_address(login: str, cfg: Config, lookup: Lookup | None = None) -> str:
    """The account address a login name belongs to (resolve(...).address)."""
    return resolve(login, cfg, lookup).address
