"""`autoport import-users FILE`: the login map, for legacy servers where the login differs from the address.

File format (UTF-8), one user per line, `#` comments and blank lines ignored:

    login,address[,extra-address...]
    jsmith,john.smith@example.org,sales@example.org,j.smith@example.org

More (the reasons and limits behind this module): docs/modules.md, sidecar/ops/users.py.
"""

from __future__ import annotations

import argparse
import sys

from sidecar import config as config_mod
from sidecar.auth.logins import InvalidLogin, fold, resolve
from sidecar.ops.actions import OpsError, read_text_file
from sidecar.store.base import Conflict, ImportedUser, Store

MAX_EXTRA = 100
INVENTORY_SOURCE = "import-users"  # the inventory source the login map's accounts are listed under


def _address(text: str, cfg: config_mod.Config) -> str:
    if "@" not in text:
        raise InvalidLogin("an address needs @domain")
    address = resolve(text, cfg).address
    if address.rpartition("@")[2] not in {d.lower() for d in cfg.mail.domains}:
        raise InvalidLogin("address is not in one of mail.domains")
    return address


def parse_users_file(text: str, cfg: config_mod.Config) -> tuple[list[ImportedUser], list[str]]:
    """The users of a login-map file, and one error per bad line (`line N: why`; never the whole line)."""
    users: list[ImportedUser] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 2 or not all(fields):
            errors.append(f"line {n}: expected login,address[,extra-address...]")
            continue
        if len(fields) > 2 + MAX_EXTRA:
            errors.append(f"line {n}: more than {MAX_EXTRA} extra addresses")
            continue
        try:
            login = fold(fields[0], cfg)
            address = _address(fields[1], cfg)
            extras = tuple(dict.fromkeys(_address(f, cfg) for f in fields[2:]))
        except InvalidLogin as e:
            errors.append(f"line {n}: {e}")
            continue
        extras = tuple(x for x in extras if x != address)
        clash = [k for k in (login, address, *extras) if k in seen and not (k == login == address)]
        if clash:
            errors.append(f"line {n}: {clash[0]} already appears on line {seen[clash[0]]}")
            continue
        for k in (login, address, *extras):
            seen[k] = n
        users.append(ImportedUser(login=login, address=address, addresses=extras))
    return users, errors


def cmd_import_users(args: argparse.Namespace) -> int:
    from sidecar.ops.cli import _load_config, _open_store

    cfg = _load_config(args)
    try:
        text = read_text_file(args.file)
    except OpsError as e:
        print(f"autoport: {e}", file=sys.stderr)
        return 1
    users, errors = parse_users_file(text, cfg)
    if errors:
        for err in errors:
            print(f"autoport: {args.file}: {err}", file=sys.stderr)
        print(f"autoport: {len(errors)} bad line(s): nothing imported", file=sys.stderr)
        return 1
    from sidecar.migration.cutover import account_names
    from sidecar.ops.cli import flush_auth_caches

    store = _open_store(cfg)
    try:
        # the names these users answered to before (a replaced extra address must stop logging in) and after
        before = {n for u in users for key in (u.login, u.address) for n in _imported_names(store, key)}
        count = store.import_users(users)
        # the login map is also a list of the legacy server's accounts: readiness and `migrate --all` see them
        store.set_inventory(INVENTORY_SOURCE, "account", [u.address for u in store.imported_users()])
        extras = sum(len(u.addresses) for u in users)
        print(f"imported {count} user(s) with {extras} extra address(es)")
        names = before | {n for u in users for n in account_names(store, u.address, (u.login, *u.addresses))}
        flush_auth_caches(cfg, store, f"import-users ({count} user(s))", sorted(names))
        from sidecar.mta import aliasmap  # extra addresses route through Postfix's alias map

        print(aliasmap.sync_now(cfg, store)[1])
    except Conflict as e:
        print(f"autoport: {args.file}: {e}: nothing imported", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def _imported_names(store: Store, key: str) -> set[str]:
    """The names of the login map's entry for `key` (login or address) as it is now; empty when none."""
    u = store.find_imported(key)
    return set() if u is None else {u.login, u.address, *u.addresses}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("import-users", help="import the login map: login,address[,extra-address...] per line")
    s.add_argument("file", metavar="FILE", help="CSV lines login,address[,extra-address...]")
    s.set_defaults(func=cmd_import_users)
