"""`autoport finalize`: Postfix and Dovecot without the sidecar, once nothing is left on the legacy server.

    autoport finalize --check                      # only say whether it may run, and why not
    autoport finalize [--exclude ADDRESS ...] [--quiet-days N]

More (the reasons and limits behind this module): docs/modules.md, sidecar/ops/finalize.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.config import Config
from sidecar.mta import aliasmap, commands
from sidecar.states import State

if TYPE_CHECKING:
    from sidecar.store.base import Store

DAY = 86400.0
MAILBOX_MAP = "autoport-mailboxes"
ALIAS_MAP = "autoport-aliases"
EVENT = "finalized"
SHOW = 20  # addresses listed per reason


class FinalizeError(Exception):
    """Finalize could not write, validate or reload the configuration (the message says what to do)."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    reasons: tuple[str, ...]
    mailboxes: tuple[str, ...]  # addresses that will exist after finalize

    @property
    def ready(self) -> bool:
        return not self.reasons


def _listing(addresses: list[str]) -> str:
    shown = ", ".join(addresses[:SHOW])
    return shown + (f" and {len(addresses) - SHOW} more" if len(addresses) > SHOW else "")


def _base(address: str, delimiter: str = "+") -> str:
    local, at, domain = address.lower().rpartition("@")
    if delimiter and delimiter in local:
        local = local.split(delimiter, 1)[0]
    return f"{local}{at}{domain}"


def is_legacy_route(route: str, cfg: Config) -> bool:
    t = cfg.target.legacy_transport
    return route == t or route.startswith(t + ":")


def check(
    cfg: Config, store: Store, *, exclude: frozenset[str] = frozenset(), quiet_days: float = 7, now: float = 0.0
) -> Verdict:
    """Whether finalize may run, and every reason why not."""
    now = now or time.time()
    since = now - quiet_days * DAY
    from sidecar.ops import inventory

    excluded = {a.lower() for a in exclude} | inventory.excluded_addresses(store)
    accounts = list(store.accounts())
    by_address = {a.address: a for a in accounts}
    reasons: list[str] = []

    pending = [a for a in accounts if a.state is not State.MIGRATED and a.address not in excluded]
    if pending:
        detail = _listing([f"{a.address} ({a.state.value})" for a in pending])
        reasons.append(
            f"{len(pending)} account(s) not migrated: {detail}. Migrate them (`autoport migrate ADDRESS`) or leave "
            "them behind with --exclude ADDRESS (or `autoport exclude ADDRESS --reason TEXT`)"
        )
    reasons += inventory.readiness_reasons(store, accounts, excluded)
    hashless = [a.address for a in accounts if a.state is State.MIGRATED and not a.has_password
                and a.address not in excluded]  # fmt: skip
    if hashless:
        reasons.append(
            f"{len(hashless)} migrated account(s) have no password hash, so nobody could log in to them after "
            f"finalize: {_listing(hashless)}. Set one (`autoport passwd`, `autoport import-hashes`) or --exclude them"
        )

    aliases = {a.alias.lower(): a for a in store.aliases()}
    relayed: dict[str, int] = {}
    for r in store.message_log_since(since):
        if not is_legacy_route(r.route, cfg):
            continue
        rcpt = r.recipient.lower()
        if _base(rcpt) in excluded or rcpt in excluded:
            continue
        if inventory.is_migrated_before(by_address.get(_base(rcpt)) or by_address.get(rcpt), r.at):
            continue  # relayed before the account migrated: the copy (initial pass or final delta) took it along
        alias = aliases.get(rcpt) or aliases.get(_base(rcpt))
        if alias is not None and r.at >= alias.created_at:
            continue  # recreated here since; Postfix expands it locally now
        relayed[rcpt] = relayed.get(rcpt, 0) + 1
    if relayed:
        n = sum(relayed.values())
        reasons.append(
            f"{n} message(s) were relayed to the legacy server in the last {quiet_days:g} day(s), for "
            f"{_listing(sorted(relayed))}. Migrate or alias those addresses (`autoport report`), then wait "
            f"until no mail has gone there for {quiet_days:g} day(s) (or lower --quiet-days)"
        )

    hits: list[str] = []
    for a in accounts:
        if a.address in excluded or a.state is not State.MIGRATED:
            continue
        if any(e.kind == "sweep-hit" and e.at >= since for e in store.events(a.address, limit=500)):
            hits.append(a.address)
    if hits:
        reasons.append(
            f"trailing sweeps still found mail in the legacy mailbox of {_listing(hits)} in the last "
            f"{quiet_days:g} day(s): a rule or queue on the legacy server still delivers there; remove it "
            "(`autoport report`, section auto_rules) and wait"
        )

    migrated = {a.address for a in accounts if a.state is State.MIGRATED and a.address not in excluded}
    blocked = [b for b in store.sweep_blocks() if b.address in migrated]
    if blocked:
        reasons.append(
            f"trailing sweeps cannot run for {_listing([b.address for b in blocked])}: {blocked[0].reason}. "
            "Mail that still reaches their legacy mailbox would go unnoticed. Configure [legacy] admin_user and "
            "admin_password (and admin_mode), restart `autoport serve`, and wait for the next sweep "
            f"(limits.sweep_interval), or --exclude them"
        )

    mailboxes = sorted({a.address for a in accounts if a.state is State.MIGRATED})
    return Verdict(tuple(reasons), tuple(mailboxes))


def finalized_at(store: Store) -> float | None:
    """When finalize last ran (None: never)."""
    for e in store.events("", limit=50):
        if e.kind == EVENT:
            return e.at
    return None


# --- writing the final configuration -----------------------------------------------------------------------


def _postfix_dir(cfg: Config) -> Path:
    return Path(cfg.target.postfix_config or "/etc/postfix")


def _dovecot_conf(cfg: Config) -> Path:
    return Path(cfg.target.dovecot_config or "/etc/dovecot/dovecot.conf")


def _map_line(key: str, value: str) -> str:
    if any(c.isspace() for c in key) or any(c in value for c in "\r\n"):
        raise FinalizeError(f"address {key!r} cannot be written to a Postfix map")
    return f"{key}\t{value}\n"


def mailbox_map(cfg: Config, store: Store, mailboxes: tuple[str, ...]) -> str:
    """virtual_mailbox_maps: each migrated address, and each login name of it that is an address here."""
    domains = {d.lower() for d in cfg.mail.domains}
    keys = set(mailboxes)
    for address in mailboxes:
        account = store.get(address)
        for login in account.logins if account else ():
            if "@" in login and login.rpartition("@")[2] in domains:
                keys.add(login)
    head = "# generated by `autoport finalize` from the state store; rerun it after adding accounts\n"
    return head + "".join(_map_line(k, "OK") for k in sorted(keys))


def alias_map(store: Store) -> str:
    """The alias map's text (sidecar.mta.aliasmap: the same map the sidecar kept while the migration ran)."""
    text, skipped = aliasmap.store_text(store)
    if skipped:
        raise FinalizeError(f"address {skipped[0]!r} cannot be written to a Postfix map")
    return text


def _run(reload: Callable[[], None], what: str) -> None:
    try:
        reload()
    except commands.CommandNotRun as e:
        raise FinalizeError(f"{what}: cannot run {e}") from None
    except commands.CommandFailed as e:
        raise FinalizeError(f"{what} failed ({e.returncode}): {e.output.strip()[-1000:]}") from None


def final_dovecot_vars(cfg: Config, recorded: dict[str, object]) -> dict[str, object]:
    """The recorded Dovecot variables with the sidecar switched off. The auth cache stays as it was rendered; a
    record from before the cache existed takes [target] auth_cache_* from the configuration (not the "off" of
    the templates then): after finalize every login is a native one, the cache's case."""
    from sidecar.mta import render

    return {**render.ADDED_DOVECOT_VARIABLES, **render.auth_cache_vars(cfg), **recorded,
            "autoport_finalized": "yes", "sasl_relay_upstream": ""}  # fmt: skip


def apply(cfg: Config, store: Store, verdict: Verdict, *, reload: bool = True) -> list[str]:
    """Write, validate and reload the final configuration; what was done, one line each."""
    from sidecar.mta import render

    pf_dir, dv_conf = _postfix_dir(cfg), _dovecot_conf(cfg)
    dv_dir = dv_conf.parent
    try:
        pf_vars, dv_vars = render.load_variables(pf_dir), render.load_variables(dv_dir)
    except render.RenderError as e:
        raise FinalizeError(str(e)) from None
    missing = [str(d / render.VARIABLES_FILE) for d, v in ((pf_dir, pf_vars), (dv_dir, dv_vars)) if v is None]
    if missing or pf_vars is None or dv_vars is None:
        raise FinalizeError(
            f"no record of how the configuration was rendered ({', '.join(missing)}): it was not written by "
            "autoport. Render it with autoport_finalized set (Ansible: postfix/dovecot role variable), or "
            "re-render it with autoport first"
        )
    done: list[str] = []
    mailboxes_file = pf_dir / MAILBOX_MAP
    render.write_atomic(mailboxes_file, mailbox_map(cfg, store, verdict.mailboxes), 0o644)
    # the alias map the sidecar kept (a configuration rendered before it existed: a texthash file, as then)
    alias_spec = str(pf_vars.get("alias_maps") or f"texthash:{pf_dir / ALIAS_MAP}")
    try:
        amap = aliasmap.AliasMap(alias_spec, str(pf_dir))
        if not amap.ours():
            raise FinalizeError(f"{amap.path} has no autoport header: it is not overwritten. Move it away first")
        amap.write(alias_map(store))
    except aliasmap.AliasMapError as e:
        raise FinalizeError(f"alias map: {e}") from None
    done.append(f"wrote {mailboxes_file} ({len(verdict.mailboxes)} account(s)) and {amap.spec}")
    pf_final = {
        **render.ADDED_POSTFIX_VARIABLES,
        **pf_vars,
        "autoport_finalized": "yes",
        "virtual_transport": cfg.target.local_transport,
        "final_mailbox_maps": f"texthash:{mailboxes_file}",
        "final_alias_maps": alias_spec,
        "sasl_relay": "",  # SMTP AUTH straight to Dovecot's socket: the sidecar's relay retires with it
    }
    dv_final = final_dovecot_vars(cfg, dv_vars)
    try:
        warnings = render.render_postfix(pf_dir, pf_final)
        done.append(f"wrote {pf_dir}/main.cf and master.cf (validated: postfix check)")
        warnings += render.render_dovecot(dv_dir, dv_final)
        done.append(f"wrote {dv_conf} and {dv_dir}/conf.d (validated: doveconf -n)")
    except render.RenderError as e:
        raise FinalizeError(f"the final configuration did not validate; nothing live was replaced: {e}") from None
    done += [f"warning: {w}" for w in warnings]
    if reload:
        _run(lambda: commands.postfix_reload(pf_dir), f"postfix -c {pf_dir} reload")
        _run(lambda: commands.doveadm_reload(cfg.target.doveadm, dv_conf), f"doveadm -c {dv_conf} reload")
        done.append("reloaded Postfix and Dovecot")
    store.record_event(
        "", EVENT, f"final configuration without the sidecar: {len(verdict.mailboxes)} account(s), "
        f"{len(store.aliases())} alias(es)"
    )  # fmt: skip
    done.append("recorded (event 'finalized'); the sidecar (`autoport serve`) may be stopped now")
    return done


# --- command line ------------------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("finalize", help="final Postfix/Dovecot configuration without the sidecar (refuses if early)")
    s.add_argument("--check", action="store_true", help="only report whether finalize may run, and why not")
    s.add_argument("--exclude", nargs="+", default=[], metavar="ADDRESS",
                   help="accounts left behind (not waited for; rejected afterwards if never migrated)")  # fmt: skip
    s.add_argument("--quiet-days", type=float, default=7.0, metavar="N",
                   help="days without mail relayed to the legacy server or found by sweeps (default 7)")  # fmt: skip
    s.set_defaults(func=cmd_finalize)


def cmd_finalize(args: argparse.Namespace) -> int:
    import os

    from sidecar import config as config_mod
    from sidecar.store import open_store

    cfg = config_mod.load(args.config or os.environ.get("AUTOPORT_CONFIG") or config_mod.DEFAULT_PATH)
    store = open_store(cfg.store.url, dovecot_group=cfg.store.dovecot_group, dovecot_role=cfg.store.dovecot_role)
    try:
        verdict = check(cfg, store, exclude=frozenset(args.exclude), quiet_days=args.quiet_days)
        if not verdict.ready:
            print("autoport finalize: not yet:" if not args.check else "finalize would refuse:")
            for r in verdict.reasons:
                print(f"  - {r}")
            return 1
        if args.check:
            print(f"finalize may run: {len(verdict.mailboxes)} migrated account(s), nothing left on the legacy server")
            return 0
        try:
            for line in apply(cfg, store, verdict):
                print(line)
        except FinalizeError as e:
            print(f"autoport finalize: {e}", file=sys.stderr)
            return 1
    finally:
        store.close()
    return 0
