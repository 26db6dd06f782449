"""`autoport inventory` and `autoport exclude`: the legacy server's own account list.

More (the reasons and limits behind this module): docs/modules.md, sidecar/ops/inventory.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sidecar.auth.logins import InvalidLogin, Lookup, resolve
from sidecar.config import Config
from sidecar.ops.actions import OpsError, our_address, read_text_file
from sidecar.states import State
from sidecar.store.base import Account, InventoryChange, Store

ACCOUNT = "account"
SHARED_FOLDER = "shared-folder"
EVENT = "inventory"
SHOW = 20


@dataclasses.dataclass
class Listing:
    """What one source says exists."""

    source: str  # "legacy", "ldap", "file:/PATH"
    accounts: dict[str, str] = dataclasses.field(default_factory=dict)  # address -> detail (where it came from)
    shared_folders: dict[str, str] = dataclasses.field(default_factory=dict)  # legacy folder -> detail
    skipped: list[str] = dataclasses.field(default_factory=list)  # names that are not addresses of ours, and why


def _add(listing: Listing, name: str, detail: str, cfg: Config, lookup: Lookup | None = None) -> None:
    """Record the account a listed name belongs to. A source lists the legacy server's logins; with a login
    map (`autoport import-users`, `lookup` = store.find_imported) a login such as `jsmith` is the account
    john.smith@, exactly as a login by that name would resolve (sidecar.auth.logins.resolve)."""
    if lookup is not None:
        try:
            identity = resolve(name, cfg, lookup)
        except InvalidLogin:
            pass
        else:
            with contextlib.suppress(OpsError):
                if our_address(name, cfg) != identity.address:
                    detail = f"{detail} (login {name})"
            listing.accounts.setdefault(identity.address, detail)
            return
    try:
        address = our_address(name, cfg)
    except OpsError as e:
        listing.skipped.append(f"{name}: {e}")
        return
    listing.accounts.setdefault(address, detail)


# --- sources ----------------------------------------------------------------------------------------------


def read_file(path: str, cfg: Config, lookup: Lookup | None = None) -> Listing:
    """One address or login a line (blank lines, `#` comments skipped; the first field of `a b`, `a,b` or a
    passwd-file line `user:{SCHEME}hash:uid:gid::home::` is the name)."""
    text = read_text_file(path)
    listing = Listing(f"file:{Path(path).resolve()}")
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name = line.split()[0].split(",")[0].split(":")[0]
        before = len(listing.skipped)
        _add(listing, name, f"line {n}", cfg, lookup)
        if len(listing.skipped) > before:
            listing.skipped[-1] = f"{path}:{n}: {listing.skipped[-1]}"
    return listing


def account_name(entry: str, prefix: str, separator: str | None) -> str | None:
    """The account an entry of an other-users namespace names ("user.alice" -> "alice"), None for a deeper
    level. Pure; Cyrus writes a "." inside a name as "^" when "." is the hierarchy separator."""
    if not entry.startswith(prefix) and not entry.lower().startswith(prefix.lower()):
        return None
    name = entry[len(prefix) :]
    if separator:
        name = name.rstrip(separator)
        if separator in name:
            return None
        if separator == ".":
            name = name.replace("^", ".")
    return name or None


def list_legacy(cfg: Config, lookup: Lookup | None = None) -> Listing:
    """The other-users namespace of the legacy server, listed by the admin (module doc)."""
    from sidecar.legacy.imap import LegacySource
    from sidecar.migration.copier import SourceAuthError, SourceError, SourceParams

    if not (cfg.legacy.admin_user and cfg.legacy.admin_password):
        raise OpsError(
            f"no legacy admin credentials in {cfg.path or 'the configuration'} (legacy.admin_user, "
            "legacy.admin_password): the legacy server lists every account only to an administrator. Without "
            "them use `autoport inventory --from file FILE` (e.g. a Dovecot passwd-file) or --from ldap"
        )
    if not cfg.legacy.imap_port:
        raise OpsError("legacy.imap_port is 0: listing the legacy accounts needs IMAP")
    params = dataclasses.replace(SourceParams.from_config(cfg.legacy, "", use_admin=True), user="")
    listing = Listing("legacy")
    try:
        with LegacySource(params) as src:
            spaces = src.namespaces()
            if not spaces.other:
                raise OpsError(
                    f"the legacy server shows {cfg.legacy.admin_user} no other-users namespace (NAMESPACE): it "
                    "cannot list its accounts this way. Give the admin an other-users namespace (Cyrus: an admin "
                    "sees user.*; Dovecot: a shared namespace with ACL rights and acl_shared_dict), or use "
                    "`autoport inventory --from file FILE` or --from ldap"
                )
            for prefix, sep in spaces.other:
                for entry in src.list_names(prefix + "%"):
                    name = account_name(entry, prefix, sep)
                    if name is not None:
                        _add(listing, name, entry, cfg, lookup)
            for prefix, _sep in spaces.shared:
                for entry in src.list_names(prefix + "*"):
                    # Cyrus' shared namespace has the empty prefix: "*" lists the personal and other-users
                    # namespaces too
                    if spaces.foreign(entry) == "shared":
                        listing.shared_folders.setdefault(entry, "shared namespace " + (prefix or '""'))
    except SourceAuthError as e:
        hint = ""
        if cfg.legacy.admin_mode == "master":
            hint = (
                ". A Dovecot master user often cannot log in as itself: list the accounts on the legacy host "
                "(`doveadm user '*' > users.txt`, or its passwd-file) and use `autoport inventory --from file FILE`"
            )
        raise OpsError(f"listing the legacy accounts failed: {e}{hint}") from None
    except SourceError as e:
        raise OpsError(f"listing the legacy accounts failed: {e}") from None
    return listing


def list_ldap(cfg: Config, lookup: Lookup | None = None) -> Listing:
    """Every entry under [ldap] base_dn matching [ldap] filter, by its mail attribute (sidecar.ops.ldapsource)."""
    from sidecar.ops import ldapsource

    listing = Listing("ldap")
    for address, dn in ldapsource.search(cfg):
        _add(listing, address, dn, cfg, lookup)
    return listing


# --- recording and reading --------------------------------------------------------------------------------


def record(store: Store, listing: Listing) -> InventoryChange:
    change = store.set_inventory(listing.source, ACCOUNT, listing.accounts)
    if listing.source == "legacy":
        store.set_inventory(listing.source, SHARED_FOLDER, listing.shared_folders)
    store.record_event(
        "", EVENT, f"{listing.source}: {len(listing.accounts)} account(s) ({len(change.added)} new, "
        f"{len(change.removed)} gone), {len(listing.shared_folders)} shared folder(s)"
    )  # fmt: skip
    return change


@dataclasses.dataclass(frozen=True)
class NeverSeen:
    address: str
    sources: tuple[str, ...]
    first_listed: float


def never_seen(store: Store, accounts: Iterable[Account] | None = None) -> list[NeverSeen]:
    """Inventoried addresses without an account here (nobody logged in, no mail), excluded ones included.

    An address is known when it is an account's address or one of its login names: both answered from the
    accounts (store.accounts() reads every login in one query), never with a query per inventoried address."""
    known: set[str] = set()
    for a in store.accounts() if accounts is None else accounts:
        known.add(a.address)
        known.update(a.logins)
    found: dict[str, tuple[set[str], float]] = {}
    for e in store.inventory(ACCOUNT):
        sources, first = found.get(e.name, (set(), e.first_seen))
        sources.add(e.source)
        found[e.name] = (sources, min(first, e.first_seen))
    out = [
        NeverSeen(address, tuple(sorted(sources)), first)
        for address, (sources, first) in sorted(found.items())
        if address not in known
    ]
    return out


def readiness_reasons(
    store: Store, accounts: list[Account], excluded: set[str], never: list[NeverSeen] | None = None
) -> list[str]:
    """Why the legacy server may not be retired yet, as far as the inventory goes (module doc). `never`: the
    caller's never_seen(store, accounts), when it has it (then the inventory is not read again when it lists
    anybody never seen)."""
    if not never and not store.inventory(ACCOUNT):
        return [
            "the legacy server's own account list was never read, so accounts nobody logged in to or sent mail "
            "to would be lost: run `autoport inventory --from legacy` (admin credentials), `--from ldap` or "
            "`--from file FILE`"
        ]
    missing = [
        n.address for n in (never_seen(store, accounts) if never is None else never) if n.address not in excluded
    ]
    if not missing:
        return []
    shown = ", ".join(missing[:SHOW]) + (f" and {len(missing) - SHOW} more" if len(missing) > SHOW else "")
    return [
        f"{len(missing)} legacy account(s) in the inventory were never seen here: {shown} (no login, no mail, not "
        "migrated). Migrate them (`autoport migrate --all` takes the inventory) or leave them behind with "
        "`autoport exclude ADDRESS --reason TEXT`"
    ]


def excluded_addresses(store: Store) -> set[str]:
    return {x.address for x in store.exclusions()}


def is_migrated_before(account: Account | None, at: float) -> bool:
    """Mail logged at `at` went to the legacy server before the account migrated: the copy (initial pass or
    final delta) took it along, so it does not block readiness."""
    return (
        account is not None
        and account.state is State.MIGRATED
        and account.migrated_at is not None
        and at < account.migrated_at
    )


def as_json(store: Store) -> dict[str, Any]:
    return {
        "accounts": [
            {"address": e.name, "source": e.source, "detail": e.detail, "first_seen": e.first_seen,
             "last_seen": e.last_seen}
            for e in store.inventory(ACCOUNT)
        ],
        "shared_folders": [{"folder": e.name, "source": e.source, "detail": e.detail}
                           for e in store.inventory(SHARED_FOLDER)],
        "never_seen": [dataclasses.asdict(n) for n in never_seen(store)],
        "excluded": [dataclasses.asdict(x) for x in store.exclusions()],
    }  # fmt: skip
