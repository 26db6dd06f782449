"""The `autoport` command: serve, status, config, store, lab, demo.

Exit codes: 0 success, 1 the thing asked for failed (e.g. account not found), 2 usage or configuration error,
75 (EX_TEMPFAIL) the store or another dependency is unavailable right now.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar import config as config_mod

if TYPE_CHECKING:
    from sidecar.store.base import Store

EX_TEMPFAIL = 75


def _load_config(args: argparse.Namespace) -> config_mod.Config:
    path = args.config or os.environ.get("AUTOPORT_CONFIG") or config_mod.DEFAULT_PATH
    return config_mod.load(path)


def _open_store(cfg: config_mod.Config) -> Store:
    from sidecar.store import open_store

    return open_store(cfg.store.url, dovecot_group=cfg.store.dovecot_group, dovecot_role=cfg.store.dovecot_role)


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if args.json:
        print(json.dumps(config_mod.as_dict(cfg), indent=2))
    else:
        sys.stdout.write(config_mod.render(cfg))
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    store = _open_store(cfg)
    try:
        if args.action == "init":
            version = store.init()
            print(f"store initialised at schema version {version}")
        elif args.action == "upgrade":
            applied = store.upgrade()
            if applied:
                print("applied schema versions " + ", ".join(map(str, applied)))
            else:
                print(f"store already at schema version {store.schema_version()}")
        else:
            print(store.schema_version())
    finally:
        store.close()
    return 0


def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    store = _open_store(cfg)
    try:
        if args.address:
            from sidecar.logins import account_address

            address = account_address(args.address, cfg)
            account = store.get(address) or store.find_by_login(args.address.lower())
            if account is None:
                if args.json:
                    print(json.dumps({"address": address, "state": None}))
                else:
                    print(f"{address}: no account (never seen)")
                return 1
            data = account.public()
            data["jobs"] = [
                {"kind": j.kind, "status": j.status, "attempts": j.attempts, "last_error": j.last_error}
                for j in store.jobs(account.address)
            ]
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                _print_account(data)
        else:
            summary = store.summary()
            if args.json:
                print(json.dumps({"accounts": summary, "total": sum(summary.values())}, indent=2))
            else:
                from rich.console import Console
                from rich.table import Table

                table = Table(title="autoport accounts")
                table.add_column("state")
                table.add_column("accounts", justify="right")
                for state, n in summary.items():
                    table.add_row(state, str(n))
                table.add_row("total", str(sum(summary.values())), style="bold")
                Console().print(table)
    finally:
        store.close()
    return 0


def _print_account(data: dict[str, object]) -> None:
    labels = [
        ("address", "address"),
        ("state", "state"),
        ("logins", "login names"),
        ("created_at", "first seen"),
        ("last_login_at", "last login"),
        ("migrated_at", "migrated"),
        ("messages_copied", "messages copied"),
        ("messages_total", "messages total"),
        ("bytes_copied", "bytes copied"),
        ("attempts", "copy attempts"),
        ("last_error", "last error"),
    ]
    for key, label in labels:
        value = data.get(key)
        if key.endswith("_at"):
            value = _fmt_time(value if isinstance(value, float | int) else None)
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        print(f"{label:>16}: {value if value not in (None, '') else '-'}")
    jobs = data.get("jobs") or []
    assert isinstance(jobs, list)
    for j in jobs:
        print(f"{'job':>16}: {j['kind']} {j['status']} attempts={j['attempts']} {j['last_error']}".rstrip())


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    from sidecar.daemon import serve

    return serve(cfg)


def cmd_lab(args: argparse.Namespace) -> int:
    from sidecar.lab import launcher

    lab_dir = Path(args.dir).resolve()
    if args.action == "up":
        info = launcher.lab_up(
            lab_dir,
            users=args.users,
            profile=args.legacy,
            external=args.legacy_external,
            store=args.store,
            bare_logins=args.bare_logins,
            seed=args.seed,
        )
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            launcher.print_summary(info)
        return 0
    if args.action == "down":
        stopped = launcher.lab_down(lab_dir)
        print(f"lab {lab_dir}: stopped {len(stopped)} process(es)" + (f": {', '.join(stopped)}" if stopped else ""))
        return 0
    if args.action == "restart":
        pid = launcher.lab_restart(lab_dir, args.name)
        print(f"{args.name} restarted, pid {pid}")
        return 0
    if args.action == "info":
        print(json.dumps(launcher.lab_info(lab_dir), indent=2))
        return 0
    raise AssertionError(args.action)


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.lab import demo

    return demo.run(Path(args.dir).resolve(), keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoport", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--config", "-c", help=f"config file (default: $AUTOPORT_CONFIG or {config_mod.DEFAULT_PATH})")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("config", help="print the effective configuration, secrets redacted")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("store", help="create or upgrade the state store schema")
    s.add_argument("action", choices=["init", "upgrade", "version"])
    s.set_defaults(func=cmd_store)

    s = sub.add_parser("status", help="one account, or a summary of all")
    s.add_argument("address", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("serve", help="run the sidecar daemon (auth socket, socketmap, milter, jobs)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("lab", help="start/stop a legacy server and a target stack on loopback")
    s.add_argument("action", choices=["up", "down", "restart", "info"])
    s.add_argument("name", nargs="?", help="component to restart (lab restart)")
    s.add_argument("--dir", required=True, help="lab directory (created)")
    s.add_argument("--json", action="store_true", help="print the lab description as JSON")
    s.add_argument("--users", type=int, default=5, help="generated legacy users")
    s.add_argument("--legacy", default="dovecot", choices=["dovecot", "courier-style"], help="legacy profile")
    s.add_argument("--legacy-external", metavar="SPEC", help="TOML file describing an existing legacy server")
    s.add_argument("--store", default="sqlite", choices=["sqlite", "postgresql"], help="state store backend")
    s.add_argument("--bare-logins", action="store_true", help="legacy users log in with bare local parts")
    s.add_argument("--seed", type=int, default=1, help="mailbox generator seed")
    s.set_defaults(func=cmd_lab)

    s = sub.add_parser("demo", help="start a lab and walk through a migration")
    s.add_argument("--dir", default="/tmp/autoport-demo")  # noqa: S108 - a lab dir must be short and world-traversable
    s.add_argument("--keep", action="store_true", help="leave the lab running afterwards")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "lab" and args.action == "restart" and not args.name:
        parser.error("lab restart needs a component NAME")
    from sidecar.store.base import StoreUnavailable

    try:
        rc: int = args.func(args)
    except config_mod.ConfigError as e:
        print(f"autoport: configuration error: {e}", file=sys.stderr)
        return 2
    except StoreUnavailable as e:
        print(f"autoport: state store unavailable: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
