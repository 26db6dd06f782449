"""The command line of `autoport inventory` and `autoport exclude` (what they do: sidecar/ops/inventory.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING

from sidecar import config as config_mod
from sidecar.ops import inventory
from sidecar.ops.actions import OpsError, our_address

if TYPE_CHECKING:
    from sidecar.store.base import Store


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("inventory", help="read the legacy server's account list (or show the inventory)")
    s.add_argument("--from", dest="source", choices=["legacy", "ldap", "file"],
                   help="legacy: IMAP other-users namespace with the admin credentials; ldap: the [ldap] "
                   "section; file: FILE, one address a line (without --from: show the inventory)")  # fmt: skip
    s.add_argument("file", nargs="?", metavar="FILE", help="with --from file")
    s.add_argument("--json", action="store_true", help="show the inventory as JSON")
    s.set_defaults(func=cmd_inventory)

    s = sub.add_parser("exclude", help="leave an account behind on purpose: finalize does not wait for it")
    s.add_argument("address", nargs="?", metavar="ADDRESS")
    s.add_argument("--reason", help="why (shown by `autoport report`); required to exclude")
    s.add_argument("--remove", action="store_true", help="take the exclusion of ADDRESS back")
    s.add_argument("--list", action="store_true", help="list the exclusions")
    s.set_defaults(func=cmd_exclude)


def _open(args: argparse.Namespace) -> tuple[config_mod.Config, Store]:
    from sidecar.store import open_store

    cfg = config_mod.load(args.config or os.environ.get("AUTOPORT_CONFIG") or config_mod.DEFAULT_PATH)
    store = open_store(cfg.store.url, dovecot_group=cfg.store.dovecot_group, dovecot_role=cfg.store.dovecot_role)
    return cfg, store


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def cmd_inventory(args: argparse.Namespace) -> int:
    if args.source == "file" and not args.file:
        print("autoport: inventory --from file needs FILE", file=sys.stderr)
        return 2
    if args.file and args.source != "file":
        print("autoport: FILE goes with --from file", file=sys.stderr)
        return 2
    cfg, store = _open(args)
    try:
        if args.source is None:
            data = inventory.as_json(store)
            if args.json:
                print(json.dumps(data, indent=2))
                return 0
            by_address: dict[str, list[str]] = {}
            for a in data["accounts"]:
                by_address.setdefault(a["address"], []).append(a["source"])
            if not by_address:
                print("no inventory yet: autoport inventory --from legacy|ldap|file FILE")
            for address, sources in by_address.items():
                print(f"{address}\t{', '.join(sources)}")
            for f in data["shared_folders"]:
                print(f"shared folder\t{f['folder']}\t{f['source']}")
            never = data["never_seen"]
            print(f"{len(by_address)} account(s), {len(never)} never seen here, {len(data['excluded'])} excluded")
            return 0
        try:
            if args.source == "file":
                listing = inventory.read_file(args.file, cfg, store.find_imported)
            elif args.source == "ldap":
                listing = inventory.list_ldap(cfg, store.find_imported)
            else:
                listing = inventory.list_legacy(cfg, store.find_imported)
        except OpsError as e:
            print(f"autoport: {e}", file=sys.stderr)
            return 1
        for note in listing.skipped:
            print(f"skipped {note}")
        change = inventory.record(store, listing)
        print(
            f"{listing.source}: {len(listing.accounts)} account(s) ({len(change.added)} new, {len(change.removed)} "
            f"no longer listed)" + (f", {len(listing.shared_folders)} shared folder(s)" if listing.shared_folders
                                    else "")
        )  # fmt: skip
        never = [n.address for n in inventory.never_seen(store)]
        if never:
            print(f"{len(never)} never seen here: {', '.join(never[:20])}" + (" ..." if len(never) > 20 else ""))
            print("migrate them with `autoport migrate --all`, or `autoport exclude ADDRESS --reason TEXT`")
    finally:
        store.close()
    return 0


def cmd_exclude(args: argparse.Namespace) -> int:
    cfg, store = _open(args)
    try:
        if args.list:
            for x in store.exclusions():
                print(f"{x.address}\t{_when(x.created_at)}\t{x.reason}")
            return 0
        if not args.address:
            print("autoport: exclude ADDRESS --reason TEXT (or --remove ADDRESS, --list)", file=sys.stderr)
            return 2
        try:
            address = our_address(args.address, cfg)
        except OpsError as e:
            print(f"autoport: {e}", file=sys.stderr)
            return 1
        if args.remove:
            if not store.remove_exclusion(address):
                print(f"autoport: {address} is not excluded", file=sys.stderr)
                return 1
            store.record_event(address, "include", "exclusion taken back")
            print(f"{address}: no longer excluded; finalize waits for it again")
            return 0
        if not (args.reason or "").strip():
            print("autoport: exclude needs --reason TEXT (it is shown in the report)", file=sys.stderr)
            return 2
        x = store.set_exclusion(address, args.reason.strip())
        store.record_event(address, "exclude", x.reason)
        account = store.get(address)
        state = account.state.value if account else "never seen"
        print(f"{address} ({state}): excluded: {x.reason}")
        if account is None or account.state.value != "migrated":
            print("finalize will not wait for it; after finalize mail to it is rejected like an unknown user")
    finally:
        store.close()
    return 0
