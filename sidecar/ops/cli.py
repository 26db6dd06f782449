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
from typing import TYPE_CHECKING, Any, cast

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
            from sidecar.auth.logins import account_address

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
    from sidecar.lab.proc import LabError

    try:
        return _lab(args)
    except LabError as e:
        print(f"autoport: {e}", file=sys.stderr)
        return 1


def _lab(args: argparse.Namespace) -> int:
    from sidecar.lab import launcher

    if args.action == "debroot":
        from sidecar.lab import debroot

        try:
            root = debroot.ensure(Path(args.dir))
        except debroot.DebrootError as e:
            print(f"autoport lab debroot: {e}", file=sys.stderr)
            return 1
        print(f"{root}: {debroot.tool_version(root, 'dovecot', '--version')}; labs go in {debroot.lab_parent(root)}/")
        return 0
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
            nodes=args.nodes,
            legacy_shared=args.legacy_shared,
            sysroot=Path(args.sysroot) if args.sysroot else None,
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


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser that takes options and positionals in any order (`lab restart --dir DIR NAME`:
    plain argparse stops filling positionals at the first option and rejects NAME as unrecognized)."""

    _inner = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._inner:  # parse_known_intermixed_args calls back in here
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoport", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--config", "-c", help=f"config file (default: $AUTOPORT_CONFIG or {config_mod.DEFAULT_PATH})")
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        p.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser),
    )

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
    s.add_argument("action", choices=["up", "down", "restart", "info", "debroot"])
    s.add_argument("name", nargs="?", help="component to restart (lab restart)")
    s.add_argument("--dir", required=True, help="lab directory (created)")
    s.add_argument("--json", action="store_true", help="print the lab description as JSON")
    s.add_argument("--users", type=int, default=5, help="generated legacy users")
    s.add_argument(
        "--legacy", default="dovecot", choices=["dovecot", "courier-style", "pop3-only"], help="legacy profile"
    )
    s.add_argument("--legacy-external", metavar="SPEC", help="TOML file describing an existing legacy server")
    s.add_argument("--store", default="sqlite", choices=["sqlite", "postgresql"], help="state store backend")
    s.add_argument("--bare-logins", action="store_true", help="legacy users log in with bare local parts")
    s.add_argument("--seed", type=int, default=1, help="mailbox generator seed")
    s.add_argument("--nodes", type=int, default=1, choices=[1, 2], help="front-end nodes (2 needs --store postgresql)")
    s.add_argument("--legacy-shared", action="store_true",
                   help="legacy server with a public folder and a folder shared between two users")  # fmt: skip
    s.add_argument(
        "--sysroot", metavar="ROOT", help="run the target's Postfix/Dovecot from this Debian 13 root (`lab debroot "
        "--dir ROOT` builds it; --dir must then be inside ROOT/l/)",
    )
    s.set_defaults(func=cmd_lab)

    s = sub.add_parser("demo", help="start a lab and walk through a migration")
    s.add_argument("--dir", default="/tmp/autoport-demo")  # noqa: S108 - a lab dir must be short and world-traversable
    s.add_argument("--keep", action="store_true", help="leave the lab running afterwards")
    s.set_defaults(func=cmd_demo)
    _add_ops_parsers(sub)
    from sidecar.ops import doctor, finalize, inventory_cli, users

    finalize.add_parser(sub)  # autoport finalize (sidecar/ops/finalize.py)
    inventory_cli.add_parsers(sub)  # autoport inventory, autoport exclude (sidecar/ops/inventory_cli.py)
    users.add_parser(sub)  # autoport import-users (sidecar/ops/users.py)
    doctor.add_parser(sub)  # autoport doctor (sidecar/ops/doctor.py)
    return p


# --- report, migrate, passwd, import-hashes, alias (ops/report.py, ops/actions.py) ----------------------------------


def _ops_error(e: Exception) -> int:
    print(f"autoport: {e}", file=sys.stderr)
    return 1


def cmd_report(args: argparse.Namespace) -> int:
    from sidecar.ops import actions as ops
    from sidecar.ops.report import COLUMNS, build_report

    cfg = _load_config(args)
    if args.rows < 0:
        print("autoport: --rows needs a number >= 0 (0: every row)", file=sys.stderr)
        return 2
    if args.format == "csv" and not args.section:
        print(f"autoport: --format csv needs --section (one of {', '.join(COLUMNS)})", file=sys.stderr)
        return 2
    store = _open_store(cfg)
    try:
        users = ops.read_address_file(args.users, cfg) if args.users else None
        report = build_report(cfg, store, days=args.days, users=users, users_source=args.users or "")
    except ops.OpsError as e:
        return _ops_error(e)
    finally:
        store.close()
    if args.format == "json":
        data = report.to_dict()
        print(json.dumps(data if not args.section else {args.section: data[args.section]}, indent=2))
    elif args.format == "csv":
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=COLUMNS[args.section], lineterminator="\n")
        w.writeheader()
        for row in report.rows(args.section):
            w.writerow({k: "; ".join(v) if isinstance(v, list) else v for k, v in row.items()})
    else:
        _print_report(report, args.section, args.rows)
    return 0


def _print_report(report: object, only: str | None, limit: int = 0) -> None:
    import datetime

    from rich.console import Console
    from rich.table import Table

    from sidecar.ops.report import COLUMNS, SECTIONS, Report

    assert isinstance(report, Report)
    console = Console()
    titles = {
        "accounts": "Accounts per domain and state",
        "dormant": "Dormant addresses: mail arrives, nobody ever logged in",
        "aliases": "Suspected aliases and lists on the legacy server (not mailboxes)",
        "auto_rules": "Auto-responders, forwards and late deliveries seen from the legacy server",
        "failures": "Copy failures",
        "legacy_traffic": f"Mail still routed to the legacy server (last {report.days} days)",
        "never_seen": "Legacy accounts never seen here (inventory: no login, no mail)",
        "excluded": "Accounts left behind on purpose (autoport exclude)",
        "shared_folders": "Shared and other users' folders on the legacy server (not copied into personal mailboxes)",
        "sweeps": "Trailing sweeps that cannot run (mail reaching these legacy mailboxes goes unnoticed)",
    }
    for section in SECTIONS:
        if section == "readiness" or (only and section != only):
            continue
        if section == "accounts":
            table = Table(title=titles[section])
            table.add_column("domain")
            states = list(report.by_state)
            for s in states:
                table.add_column(s, justify="right")
            for domain, counts in report.by_domain.items():
                table.add_row(domain, *(str(counts[s]) for s in states))
            table.add_row("total", *(str(report.by_state[s]) for s in states), style="bold")
            console.print(table)
            continue
        total = report.count(section)
        if not total:
            console.print(f"{titles[section]}: none")
            continue
        # --rows N: a table shows its first N rows (0: all) and says how many it left out
        rows = report.rows(section, limit or None)
        table = Table(title=titles[section])
        for col in COLUMNS[section]:
            justify = "right" if col in ("messages", "bytes", "attempts") else "left"
            # addresses are never cut: an administrator copies them into the next command
            overflow = "fold" if col in ("address", "recipient", "sender") else "ellipsis"
            table.add_column(col.replace("_", " "), justify=justify, overflow=overflow)  # type: ignore[arg-type]
        for row in rows:
            cells = []
            for c in COLUMNS[section]:
                v = row[c]
                if c in ("first_seen", "last_seen", "updated_at", "first_listed", "excluded_at") and v:
                    v = datetime.datetime.fromisoformat(v).astimezone().strftime("%Y-%m-%d %H:%M")
                cells.append("\n".join(v) if isinstance(v, list) else str(v))
            table.add_row(*cells)
        console.print(table)
        if total > len(rows):
            console.print(
                f"{total - len(rows)} more row(s) not shown ({total} in all): `autoport report --section {section} "
                "--rows 0` shows every row, --format csv or json lists them too",
                soft_wrap=True,
            )
    if not only or only == "readiness":
        if report.readiness.ready:
            console.print("[bold green]Ready to retire the legacy server.[/]")
        else:
            console.print("[bold red]Not ready to retire the legacy server:[/]")
            for reason in report.readiness.reasons:
                console.print(f"  - {reason}")


def cmd_migrate(args: argparse.Namespace) -> int:
    from sidecar.ops import actions as ops

    if bool(args.addresses) == bool(args.all or args.dormant):
        print("autoport: migrate needs ADDRESS... or --dormant or --all (not both)", file=sys.stderr)
        return 2
    cfg = _load_config(args)
    store = _open_store(cfg)
    try:
        ops.require_admin(cfg)
        if args.all:
            if args.from_file:
                addresses = ops.read_address_file(args.from_file, cfg)
                print(f"legacy user list: {args.from_file} ({len(addresses)} addresses)")
            else:
                addresses = ops.known_addresses(cfg, store)
                print(
                    f"legacy user list: no --from FILE, so the store's accounts and the recipients in the message "
                    f"log, and the inventory (`autoport inventory`) ({len(addresses)} addresses; suspected aliases "
                    "and lists and excluded accounts left out)"
                )
        elif args.dormant:
            from sidecar.ops.report import build_report

            report = build_report(cfg, store)
            addresses = [d.address for d in report.dormant if d.state != "migrated"]
            print(f"dormant addresses: {len(addresses)}")
            if report.aliases:
                print(
                    f"left out {len(report.aliases)} suspected alias(es)/list(s): "
                    + ", ".join(a.address for a in report.aliases)
                    + " (name them to migrate them anyway)"
                )
        else:
            addresses = []
            for a in args.addresses:
                address = ops.our_address(a, cfg)
                if address not in addresses:
                    addresses.append(address)
        if not addresses:
            print("nothing to migrate")
            return 0
        queued = ops.queue_migrations(cfg, store, addresses)
        for q in queued:
            print(f"{q.address}: {q.outcome}" + (f" (was {q.before})" if q.before and q.outcome == "queued" else ""))
        if not args.wait:
            print("the running sidecar (autoport serve) copies them; follow with `autoport status ADDRESS`")
            return 0
        return _wait_migrations(cfg, store, [q.address for q in queued], args.timeout)
    except ops.OpsError as e:
        return _ops_error(e)
    finally:
        store.close()


def _wait_migrations(cfg: config_mod.Config, store: Store, addresses: list[str], timeout: float) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from sidecar.ops import actions as ops
    from sidecar.states import State

    console = Console()
    done_states = (State.MIGRATED, State.FAILED)
    started = time.monotonic()
    last_change = started
    warned = False
    seen: dict[str, tuple[object, ...]] = {}
    accounts = ops.progress(store, addresses)
    console.print(
        f"waiting for {len(addresses)} account(s); the sidecar copies {cfg.limits.copy_concurrency} at a time "
        "(limits.copy_concurrency)"
    )
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        overall = bar.add_task("accounts done", total=len(addresses))
        tasks: dict[str, TaskID] = {}
        finished: set[str] = set()
        while True:
            accounts = ops.progress(store, addresses)
            for address, acc in accounts.items():
                if acc is None or address in finished:
                    continue
                key = (acc.state, acc.messages_copied, acc.messages_total)
                if seen.get(address) != key:
                    seen[address] = key
                    last_change = time.monotonic()
                active = acc.state in (State.COPYING, State.CUTOVER) and (acc.messages_total or acc.messages_copied)
                if (active or acc.state in done_states) and address not in tasks:
                    tasks[address] = bar.add_task(address, total=acc.messages_total or None)
                if address in tasks:
                    bar.update(
                        tasks[address],
                        description=f"{address} {acc.state.value}",
                        completed=acc.messages_copied,
                        total=acc.messages_total or None,
                    )
                if acc.state in done_states:
                    finished.add(address)
                    bar.update(overall, advance=1)
                    if address in tasks:
                        bar.update(tasks[address], visible=False)
                    bar.console.print(f"{address}: {acc.state.value} ({acc.messages_copied} messages)")
            if len(finished) == len(addresses):
                break
            now = time.monotonic()
            if timeout and now - started > timeout:
                bar.console.print(f"timed out after {timeout:.0f} s; the copies go on in the sidecar")
                break
            if not warned and now - last_change > 60:
                bar.console.print("no progress for 60 s: is `autoport serve` running with limits.copy_concurrency > 0?")
                warned = True
            time.sleep(0.5)
    table = Table(title="bulk migration")
    for col in ("address", "state", "messages", "bytes", "last error"):
        table.add_column(col, justify="right" if col in ("messages", "bytes") else "left")
    for address, acc in accounts.items():
        if acc is None:
            table.add_row(address, "-", "0", "0", "no account")
            continue
        table.add_row(address, acc.state.value, str(acc.messages_copied), str(acc.bytes_copied), acc.last_error or "")
    console.print(table)
    states = [a.state if a else None for a in accounts.values()]
    if all(s is State.MIGRATED for s in states):
        return 0
    return 1 if any(s is State.FAILED for s in states) else EX_TEMPFAIL


def flush_auth_caches(cfg: config_mod.Config, store: Store, label: str, names: list[str]) -> None:
    """After a password or login change: forget these names in Dovecot's auth cache here and on every node
    (sidecar.migration.cutover.flush_everywhere), waiting up to limits.kick_timeout for the nodes; says what
    it could not do."""
    import contextlib

    from sidecar.migration.cutover import KICK_WINDOW, flush_everywhere
    from sidecar.store.base import StoreError

    if not names:
        return
    try:
        local, acks, missing = flush_everywhere(cfg, store, label, names, wait=cfg.limits.kick_timeout)
    except StoreError as e:
        print(f"autoport: the auth cache flush could not be asked of the other nodes: {e}", file=sys.stderr)
        return
    if local.startswith("not flushed"):
        print(f"autoport: Dovecot's auth cache here: {local}", file=sys.stderr)
    if missing:
        print(
            f"autoport: node(s) {', '.join(missing)} did not confirm the auth cache flush within "
            f"{cfg.limits.kick_timeout:g} s (their sidecar carries it out when it runs again); until then they may "
            f"answer from a cached entry for up to [target] auth_cache_ttl = {cfg.target.auth_cache_ttl} s",
            file=sys.stderr,
        )
    else:
        print(f"auth cache flushed here and on {len(acks)} node(s)")
    with contextlib.suppress(StoreError):
        asleep = sorted(set(store.live_nodes(KICK_WINDOW)) - set(store.live_nodes(cfg.limits.node_timeout)))
        if asleep:
            print(
                f"autoport: node(s) {', '.join(asleep)} have no running sidecar: each flushes when its sidecar "
                "starts again; meanwhile its Dovecot may answer from a cached entry (`doveadm auth cache flush` "
                "there clears it)",
                file=sys.stderr,
            )


def cmd_passwd(args: argparse.Namespace) -> int:
    import getpass

    from sidecar.ops import actions as ops

    cfg = _load_config(args)
    try:
        address = ops.our_address(args.address, cfg)
    except ops.OpsError as e:
        return _ops_error(e)
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"new password for {address}: ")
        if getpass.getpass("again: ") != password:
            print("autoport: the passwords differ; nothing changed", file=sys.stderr)
            return 1
    store = _open_store(cfg)
    from sidecar.migration.cutover import account_names

    try:
        account = ops.set_password(cfg, store, address, password)
        print(f"password set for {account.address} ({cfg.hash.scheme})")
        if account.state.value != "migrated":
            print(
                f"{account.address} is {account.state.value}: the password works once it is migrated; until then "
                "its logins are checked on the legacy server, and a successful one replaces it"
            )
        # Dovecot's auth cache may hold the old hash: the old password must stop working at once, everywhere
        flush_auth_caches(cfg, store, account.address, account_names(store, account.address))
    except ops.OpsError as e:
        return _ops_error(e)
    finally:
        store.close()
    return 0


def cmd_import_hashes(args: argparse.Namespace) -> int:
    from sidecar.ops import actions as ops

    cfg = _load_config(args)
    try:
        text = ops.read_text_file(args.file)
    except ops.OpsError as e:
        print(f"autoport: {e}", file=sys.stderr)
        return 1
    try:
        schemes = ops.dovecot_schemes(cfg)
        entries, errors = ops.parse_hash_file(text, cfg, schemes)
    except ops.OpsError as e:
        return _ops_error(e)
    if errors:
        for err in errors:
            print(f"autoport: {args.file}: {err}", file=sys.stderr)
        print(f"autoport: {len(errors)} bad line(s): nothing imported", file=sys.stderr)
        return 1
    store = _open_store(cfg)
    from sidecar.migration.cutover import account_names

    try:
        result = ops.import_hashes(store, entries, force=args.force)
        print(f"imported {len(result.imported)} password hash(es)" + (
            f", {len(result.created)} new account(s) (discovered)" if result.created else ""))  # fmt: skip
        if result.kept:
            print(f"kept {len(result.kept)} account(s) that already have a password (--force replaces): "
                  + ", ".join(result.kept))  # fmt: skip
        # replaced hashes: Dovecot's auth cache must not keep the old ones anywhere
        names = sorted({n for a in result.imported for n in account_names(store, a)})
        flush_auth_caches(cfg, store, f"import-hashes ({len(result.imported)} account(s))", names)
    finally:
        store.close()
    return 0


def cmd_alias(args: argparse.Namespace) -> int:
    from sidecar.ops import actions as ops

    cfg = _load_config(args)
    store = _open_store(cfg)
    try:
        if args.action == "add":
            if not args.alias or not args.targets:
                print("autoport: alias add ALIAS TARGET[,TARGET...]", file=sys.stderr)
                return 2
            alias = ops.add_alias(cfg, store, args.alias, args.targets, replace=args.replace)
            print(f"{alias.alias} -> {', '.join(alias.targets)}")
        elif args.action == "remove":
            if not args.alias:
                print("autoport: alias remove ALIAS", file=sys.stderr)
                return 2
            address = ops.alias_address(args.alias, cfg)
            if not store.remove_alias(address):
                print(f"autoport: no alias {address}", file=sys.stderr)
                return 1
            print(f"{address} removed")
        elif args.action == "sync":
            pass  # the map is written below
        elif args.action == "list":
            rows = store.aliases()
            if args.json:
                print(json.dumps([{"alias": a.alias, "targets": list(a.targets)} for a in rows], indent=2))
            else:
                for a in rows:
                    print(f"{a.alias} {', '.join(a.targets)}")  # virtual(5) lines: `alias import` reads them back
        else:
            if not args.alias:
                print("autoport: alias import FILE", file=sys.stderr)
                return 2
            try:
                text = ops.read_text_file(args.alias)
            except ops.OpsError as e:
                print(f"autoport: {e}", file=sys.stderr)
                return 1
            entries, errors, notes = ops.parse_virtual(text, cfg)
            for n in notes:
                print(f"{args.alias}: {n}")
            if errors:
                for err in errors:
                    print(f"autoport: {args.alias}: {err}", file=sys.stderr)
                print(f"autoport: {len(errors)} bad line(s): nothing imported", file=sys.stderr)
                return 1
            done = ops.import_aliases(cfg, store, entries)
            print(f"imported {len(done)} alias(es)")
        if args.action != "list":
            from sidecar.mta import aliasmap

            written, line = aliasmap.sync_now(cfg, store)
            if args.action == "sync" and not written:
                print(f"autoport: {line}", file=sys.stderr)
                return 1
            print(line)
    except ops.OpsError as e:
        return _ops_error(e)
    finally:
        store.close()
    return 0


def _add_ops_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sidecar.ops.report import SECTIONS

    s = sub.add_parser("report", help="what is left before the legacy server can be retired")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")
    s.add_argument("--section", choices=SECTIONS, help="one section only (required with --format csv)")
    s.add_argument("--days", type=int, default=7, help="window for mail still routed to the legacy server")
    s.add_argument("--users", metavar="FILE", help="the legacy server's user list (one address per line)")
    s.add_argument("--rows", type=int, default=50, metavar="N",
                   help="rows per table (default 50; 0: all); csv and json always list every row")  # fmt: skip
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("migrate", help="migrate accounts in bulk with the legacy admin credentials")
    s.add_argument("addresses", nargs="*", metavar="ADDRESS")
    group = s.add_mutually_exclusive_group()
    group.add_argument("--dormant", action="store_true", help="every dormant address of `autoport report`")
    group.add_argument("--all", action="store_true",
                       help="every legacy user (--from FILE, or the inventory and what the store knows)")  # fmt: skip
    s.add_argument("--from", dest="from_file", metavar="FILE", help="legacy user list for --all, one address a line")
    s.add_argument("--wait", action="store_true", help="show progress until each account is migrated or failed")
    s.add_argument("--timeout", type=float, default=0.0, help="stop waiting after SECONDS (0: never)")
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("passwd", help="set an account's password (read from the terminal, or --stdin)")
    s.add_argument("address", metavar="ADDRESS")
    s.add_argument("--stdin", action="store_true", help="read the password from the first line of stdin")
    s.set_defaults(func=cmd_passwd)

    s = sub.add_parser("import-hashes", help="import Dovecot-compatible hashes exported from the legacy server")
    s.add_argument("file", metavar="FILE", help="user:{SCHEME}hash lines (passwd-file) or address,hash (CSV)")
    s.add_argument("--force", action="store_true", help="also replace hashes of accounts that have one")
    s.set_defaults(func=cmd_import_hashes)

    s = sub.add_parser("alias", help="aliases served to Postfix (virtual_alias_maps)")
    s.add_argument("action", choices=["add", "remove", "list", "import", "sync"],
                   help="sync: write this host's alias map from the store now")  # fmt: skip
    s.add_argument("alias", nargs="?", metavar="ALIAS|FILE")
    s.add_argument("targets", nargs="*", metavar="TARGET[,TARGET...]")
    s.add_argument("--replace", action="store_true", help="alias add: the targets given replace the old ones")
    s.add_argument("--json", action="store_true", help="alias list as JSON")
    s.set_defaults(func=cmd_alias)


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
