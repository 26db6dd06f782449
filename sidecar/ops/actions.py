"""Operator actions behind `autoport migrate`, `passwd`, `import-hashes` and `alias` (no terminal I/O here).

Bulk migration queues copy jobs; the running sidecar's job runner copies them with the legacy admin
credentials (cfg.legacy.admin_user / admin_password / admin_mode) within its limits (limits.copy_concurrency per
node). Such accounts have no password hash: while the legacy server is up, their first login is verified there
once (sidecar.auth.policy) and its hash stored; `passwd` and `import-hashes` give them one beforehand.

Errors for the administrator are OpsError, whose message says what to do; it never carries a password or a hash.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from collections.abc import Iterable
from pathlib import Path

from sidecar.auth import passwords
from sidecar.config import Config
from sidecar.mta import commands
from sidecar.states import IllegalTransition, State, in_flight, is_local
from sidecar.store.base import Account, Alias, Conflict, Store

BULK_REASON = "bulk migration with legacy admin credentials"
# schemes that store the password itself: never accepted into the store
PLAINTEXT_SCHEMES = frozenset({"PLAIN", "CLEAR", "CLEARTEXT", "PLAIN-TRUNC"})
ENCODING_SUFFIXES = (".B64", ".BASE64", ".HEX")
_SCHEME_RE = re.compile(r"^\{([A-Za-z0-9._-]+)\}(\S+)$")


class OpsError(Exception):
    """An operator mistake or refusal, explained for the administrator."""


# --- addresses ------------------------------------------------------------------------------------------


def our_address(text: str, cfg: Config) -> str:
    """An address of one of our domains (bare names get the default domain); OpsError otherwise."""
    text = text.strip()
    if not text or any(c.isspace() or ord(c) < 0x20 or c in ",:;<>" for c in text):
        raise OpsError(f"{text!r} is not an address")
    if cfg.mail.lowercase:
        text = text.lower()
    local, at, domain = text.rpartition("@")
    if not at:
        local, domain = text, cfg.default_domain()
        if not domain:
            raise OpsError(f"{text!r} has no domain and mail.domains is empty")
    domain = domain.lower()
    if not local or domain not in {d.lower() for d in cfg.mail.domains}:
        raise OpsError(f"{text!r} is not an address of {', '.join(cfg.mail.domains) or 'our domains'}")
    return f"{local}@{domain}"


def read_text_file(path: str) -> str:
    """An operator's input file (UTF-8); OpsError naming the file when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OpsError(f"{path}: cannot read: {e}") from None


def read_address_file(path: str, cfg: Config) -> list[str]:
    """One address per line; blank lines and # comments skipped; extra fields after the address ignored."""
    text = read_text_file(path)
    out: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            address = our_address(line.split()[0].split(",")[0], cfg)
        except OpsError as e:
            raise OpsError(f"{path}:{n}: {e}") from None
        if address not in out:
            out.append(address)
    return out


# --- bulk migration -------------------------------------------------------------------------------------


def require_admin(cfg: Config) -> None:
    legacy = cfg.legacy
    if not (legacy.admin_user and legacy.admin_password):
        raise OpsError(
            f"no legacy admin credentials in {cfg.path or 'the configuration'}: set legacy.admin_user and "
            "legacy.admin_password (and legacy.admin_mode = authzid or master) so the sidecar can read "
            "mailboxes of users who never log in"
        )


@dataclasses.dataclass(frozen=True)
class Queued:
    address: str
    before: str  # state before ("" = no account)
    outcome: str  # "queued" | "already migrated" | "in progress"


def queue_migration(store: Store, address: str) -> Queued:
    """Move the account to copying (creating it if needed) and queue its copy job, runnable now."""
    state = store.state_of(address)
    before = state.value if state else ""
    for _ in range(3):
        if is_local(state):
            return Queued(address, before, "already migrated")
        if state in (None, State.DISCOVERED):
            try:
                store.transition(address, State.COPYING, expect=state, reason=BULK_REASON)
            except (Conflict, IllegalTransition):
                state = store.state_of(address)  # moved by a login or another node meanwhile: look again
                continue
        outcome = "in progress" if in_flight(state) else "queued"
        store.enqueue(address, "copy")
        store.wake(address, "copy")  # a job waiting for the user's password may run now with admin credentials
        return Queued(address, before, outcome)
    raise OpsError(f"{address}: its state keeps changing; try again")


def queue_migrations(cfg: Config, store: Store, addresses: Iterable[str]) -> list[Queued]:
    require_admin(cfg)
    return [queue_migration(store, a) for a in addresses]


def known_addresses(cfg: Config, store: Store) -> list[str]:
    """The legacy user list when no file is given: every account in the store, every inventoried account
    (`autoport inventory`) and every recipient of our domains in the message log, without aliases recreated here,
    addresses the report suspects are aliases, and excluded accounts (`autoport exclude`)."""
    from sidecar.ops.report import build_report

    report = build_report(cfg, store)
    skip = {a.alias for a in store.aliases()} | {s.address for s in report.aliases}
    skip |= {x.address for x in store.exclusions()}
    found = {a.address for a in store.accounts()} | {d.address for d in report.dormant}
    found |= {n.address for n in report.never_seen}
    return sorted(found - skip)


def progress(store: Store, addresses: Iterable[str]) -> dict[str, Account | None]:
    return {a: store.get(a) for a in addresses}


# --- passwords ------------------------------------------------------------------------------------------


def set_password(cfg: Config, store: Store, address: str, password: str) -> Account:
    """Hash the password (cfg.hash) and store it for an existing account."""
    if not password:
        raise OpsError("empty password refused")
    account = store.get(address) or store.find_by_login(address)
    if account is None:
        raise OpsError(f"no account {address}: migrate it first (autoport migrate {address})")
    try:
        store.set_password_hash(account.address, passwords.hash_password(password, cfg.hash))
    except passwords.HashError as e:
        raise OpsError(f"cannot hash the password: {e}") from None
    updated = store.get(account.address)
    assert updated is not None
    return updated


def dovecot_schemes(cfg: Config) -> frozenset[str]:
    """The password schemes this host's Dovecot verifies (`doveadm pw -l`)."""
    cmd = commands.doveadm_argv(cfg.target.doveadm, cfg.target.dovecot_config, "pw", "-l")
    try:
        return commands.password_schemes(cfg.target.doveadm, cfg.target.dovecot_config)
    except commands.CommandNotRun as e:
        raise OpsError(f"cannot list Dovecot's password schemes ({' '.join(cmd)}): {e}") from None
    except commands.CommandFailed as e:
        err = e.stderr.decode("utf-8", "replace").strip()[:200]
        raise OpsError(f"cannot list Dovecot's password schemes ({' '.join(cmd)}): {err}") from None


@dataclasses.dataclass(frozen=True)
class HashLine:
    line: int
    address: str
    scheme: str
    value: str = dataclasses.field(repr=False)  # "{SCHEME}..." as Dovecot stores it


def check_hash(value: str, schemes: frozenset[str]) -> str:
    """The scheme of a "{SCHEME}hash" value Dovecot can verify; OpsError (without the value) otherwise."""
    m = _SCHEME_RE.match(value)
    if not m:
        raise OpsError("not a {SCHEME}hash value")
    scheme = m.group(1).upper()
    base = next((scheme[: -len(s)] for s in ENCODING_SUFFIXES if scheme.endswith(s)), scheme)
    if base in PLAINTEXT_SCHEMES:
        raise OpsError(f"scheme {base} stores the password in clear: refused")
    if base not in schemes:
        raise OpsError(f"scheme {base} is not supported by this Dovecot (doveadm pw -l)")
    return base


def parse_hash_file(text: str, cfg: Config, schemes: frozenset[str]) -> tuple[list[HashLine], list[str]]:
    """passwd-file lines (user:{SCHEME}hash[:...]) or CSV (address,{SCHEME}hash, optional header line).

    Returns the entries and the errors ("line N: reason"); errors never quote the hash.
    """
    entries: list[HashLine] = []
    errors: list[str] = []
    seen: set[str] = set()
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    is_csv = "," in first and (":" not in first or first.index(",") < first.index(":"))
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if is_csv:
            fields = next(csv.reader(io.StringIO(line)))
            if len(fields) < 2:
                errors.append(f"line {n}: expected address,hash")
                continue
            user, value = fields[0].strip(), ",".join(fields[1:]).strip()  # argon2 parameters contain commas
            if n == 1 and not value.startswith("{"):
                continue  # header line
        else:
            parts = line.split(":")
            if len(parts) < 2:
                errors.append(f"line {n}: expected user:{{SCHEME}}hash")
                continue
            user, value = parts[0].strip(), parts[1].strip()
        try:
            address = our_address(user, cfg)
            scheme = check_hash(value, schemes)
        except OpsError as e:
            errors.append(f"line {n}: {e}")
            continue
        if address in seen:
            errors.append(f"line {n}: {address} appears twice")
            continue
        seen.add(address)
        entries.append(HashLine(n, address, scheme, value))
    return entries, errors


@dataclasses.dataclass(frozen=True)
class HashImport:
    imported: list[str]
    kept: list[str]  # accounts with a password already (a login or passwd set it)
    created: list[str]  # accounts that did not exist (created as discovered)


def import_hashes(store: Store, entries: list[HashLine], *, force: bool = False) -> HashImport:
    imported: list[str] = []
    kept: list[str] = []
    created: list[str] = []
    for e in entries:
        account = store.get(e.address)
        if account is not None and account.has_password and not force:
            kept.append(e.address)
            continue
        if account is None:
            try:
                store.transition(e.address, State.DISCOVERED, expect=None, reason="password hash imported")
                created.append(e.address)
            except (Conflict, IllegalTransition):
                pass  # created meanwhile by a login: it has a fresh hash then, unless it does not
            account = store.get(e.address)
            if account is not None and account.has_password and not force:
                kept.append(e.address)
                continue
        store.set_password_hash(e.address, e.value)
        imported.append(e.address)
    return HashImport(imported, kept, created)


# --- aliases --------------------------------------------------------------------------------------------


def target_address(text: str) -> str:
    t = text.strip().lower()
    local, at, domain = t.rpartition("@")
    if not at or not local or not domain or "." not in domain or any(c.isspace() or c in ',:;<>"' for c in t):
        raise OpsError(f"alias target {text!r} is not a full address")
    return t


def split_targets(text: str | Iterable[str]) -> list[str]:
    parts = text if not isinstance(text, str) else [text]
    out: list[str] = []
    for p in parts:
        for t in re.split(r"[,\s]+", p):
            if t:
                address = target_address(t)
                if address not in out:
                    out.append(address)
    return out


def alias_address(text: str, cfg: Config) -> str:
    if text.strip().startswith("@"):
        raise OpsError(f"{text!r}: catch-all aliases are not supported (the map is asked full addresses only)")
    if "@" not in text:
        raise OpsError(f"{text!r}: an alias is a full address of {', '.join(cfg.mail.domains)}")
    return our_address(text, cfg)


def add_alias(cfg: Config, store: Store, alias: str, targets: list[str], *, replace: bool = False) -> Alias:
    """Create an alias or add targets to it (replace=True: the targets given are all of them)."""
    alias = alias_address(alias, cfg)
    targets = split_targets(targets)
    if not targets:
        raise OpsError(f"alias {alias} needs at least one target")
    state = store.state_of(alias)
    if state is not None:
        raise OpsError(f"{alias} is an account ({state.value}): an alias would take its mail away from its mailbox")
    if targets == [alias]:
        raise OpsError(f"alias {alias} cannot point only at itself")
    if not replace:
        old = store.alias_targets(alias) or ()
        targets = [*old, *(t for t in targets if t not in old)]
    return store.set_alias(alias, targets)


def parse_virtual(text: str, cfg: Config) -> tuple[list[tuple[str, list[str]]], list[str], list[str]]:
    """Postfix virtual(5) lines `alias target1, target2` (continuation lines start with white space).

    Returns (entries merged per alias, errors, notes). Domain lines (`example.org anything`) are noted and
    skipped; catch-alls and bare names are errors.
    """
    logical: list[tuple[int, str]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0].isspace() and logical:
            logical[-1] = (logical[-1][0], logical[-1][1] + " " + raw.strip())
        else:
            logical.append((n, raw.strip()))
    merged: dict[str, list[str]] = {}
    errors: list[str] = []
    notes: list[str] = []
    for n, line in logical:
        key, _, rest = line.partition(" ") if " " in line else line.partition("\t")
        rest = rest.strip()
        if "@" not in key and "." in key:
            notes.append(f"line {n}: {key} declares a virtual alias domain: skipped (our domains are mailbox domains)")
            continue
        try:
            alias = alias_address(key, cfg)
            targets = split_targets(rest)
            if not targets:
                raise OpsError(f"alias {alias} has no target")
        except OpsError as e:
            errors.append(f"line {n}: {e}")
            continue
        into = merged.setdefault(alias, [])
        into.extend(t for t in targets if t not in into)
    return list(merged.items()), errors, notes


def import_aliases(cfg: Config, store: Store, entries: list[tuple[str, list[str]]]) -> list[Alias]:
    """Set every alias of the file to exactly its targets there (all checked before any is written)."""
    problems = []
    for alias, targets in entries:
        state = store.state_of(alias)
        if state is not None:
            problems.append(f"{alias} is an account ({state.value}): an alias would take its mail away")
        elif targets == [alias]:
            problems.append(f"alias {alias} cannot point only at itself")
    if problems:
        raise OpsError("; ".join(problems))
    return [store.set_alias(alias, targets) for alias, targets in entries]
