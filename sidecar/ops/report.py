"""`autoport report`: what is left before the legacy server can be retired, as plain data (the CLI renders it).

build_report() reads the state store (accounts, events, aliases, the milter's message log) and returns a Report.
Report.to_dict() is the JSON document (`autoport report --format json`); Report.rows(SECTION) the rows of one
section (`--format csv --section SECTION`, header = the field names below). Field names are stable; times are
ISO 8601 UTC strings ("2026-11-26T09:33:49Z") or "" when unknown; `messages` and `bytes` are integers.

More (the reasons and limits behind this module): docs/modules.md, sidecar/ops/report.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Iterable
from typing import Any

from sidecar.config import Config
from sidecar.ops import inventory
from sidecar.states import State
from sidecar.store.base import Account, MessageRecord, Store

DAY = 86400.0
SECTIONS = (
    "accounts", "dormant", "aliases", "auto_rules", "failures", "legacy_traffic", "sweeps", "never_seen", "excluded",
    "shared_folders", "readiness",
)  # fmt: skip
COLUMNS: dict[str, tuple[str, ...]] = {
    "accounts": ("domain", "state", "accounts"),
    "dormant": ("address", "state", "messages", "bytes", "first_seen", "last_seen"),
    "aliases": ("address", "kind", "messages", "bytes", "last_seen", "evidence"),
    "auto_rules": ("kind", "sender", "recipient", "messages", "last_seen", "detail"),
    "failures": ("address", "state", "attempts", "last_error", "updated_at"),
    "legacy_traffic": ("recipient", "state", "messages", "bytes", "last_seen"),
    "never_seen": ("address", "sources", "first_listed"),
    "excluded": ("address", "reason", "excluded_at"),
    "shared_folders": ("folder", "source", "detail"),
    "sweeps": ("address", "reason", "since"),
    "readiness": ("ready", "reason"),
}
# RFC 2142 mailbox names and other names that are nearly always aliases or shared mailboxes
_ROLES = """postmaster abuse hostmaster webmaster noc security info sales support marketing admin administrator
    billing office contact help hr jobs noreply no-reply mailer-daemon root usenet news uucp ftp www team staff all"""
ROLE_NAMES = frozenset(_ROLES.split())
AUTO_REPLY_PRECEDENCE = ("auto_reply",)
BULK_PRECEDENCE = ("bulk", "junk")


def iso(t: float | None) -> str:
    if not t:
        return ""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass
class Traffic:
    messages: int = 0
    bytes: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0

    def add(self, r: MessageRecord) -> None:
        self.messages += 1
        self.bytes += r.size
        self.first_seen = min(self.first_seen or r.at, r.at)
        self.last_seen = max(self.last_seen, r.at)


@dataclasses.dataclass(frozen=True)
class Dormant:
    address: str
    state: str
    messages: int
    bytes: int
    first_seen: float
    last_seen: float


@dataclasses.dataclass(frozen=True)
class SuspectedAlias:
    address: str
    kind: str  # "list" | "alias"
    messages: int
    bytes: int
    last_seen: float
    evidence: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class AutoRule:
    kind: str  # "auto-reply" | "auto-generated" | "forward" | "sweep-hit"
    sender: str
    recipient: str
    messages: int
    last_seen: float
    detail: str


@dataclasses.dataclass(frozen=True)
class Failure:
    address: str
    state: str
    attempts: int
    last_error: str
    updated_at: float


@dataclasses.dataclass(frozen=True)
class LegacyTraffic:
    recipient: str
    state: str
    messages: int
    bytes: int
    last_seen: float


@dataclasses.dataclass(frozen=True)
class NeverSeen:
    address: str
    sources: tuple[str, ...]
    first_listed: float


@dataclasses.dataclass(frozen=True)
class Excluded:
    address: str
    reason: str
    excluded_at: float


@dataclasses.dataclass(frozen=True)
class SharedFolder:
    folder: str
    source: str
    detail: str


@dataclasses.dataclass(frozen=True)
class SweepBlocked:
    address: str
    reason: str
    since: float


@dataclasses.dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Report:
    generated_at: float
    days: int
    users_source: str  # where the legacy user list came from ("" when none was given)
    by_state: dict[str, int]
    by_domain: dict[str, dict[str, int]]
    dormant: list[Dormant]
    aliases: list[SuspectedAlias]
    auto_rules: list[AutoRule]
    failures: list[Failure]
    legacy_traffic: list[LegacyTraffic]
    readiness: Readiness
    never_seen: list[NeverSeen] = dataclasses.field(default_factory=list)
    excluded: list[Excluded] = dataclasses.field(default_factory=list)
    shared_folders: list[SharedFolder] = dataclasses.field(default_factory=list)
    sweeps: list[SweepBlocked] = dataclasses.field(default_factory=list)

    def count(self, section: str) -> int:
        """How many rows rows(section) has."""
        if section in ("accounts", "readiness"):
            return len(self.rows(section))
        return len(getattr(self, section))

    def rows(self, section: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The rows of one section with the documented field names (times as ISO strings); the first `limit`
        only when given (the tables of `autoport report --rows N`; only those rows are built)."""
        if section == "accounts":
            return [
                {"domain": d, "state": s, "accounts": n}
                for d, states in self.by_domain.items()
                for s, n in states.items()
            ]
        if section == "readiness":
            ready = "yes" if self.readiness.ready else "no"
            return [{"ready": ready, "reason": r} for r in self.readiness.reasons] or [{"ready": ready, "reason": ""}]
        items: list[Any] = getattr(self, section)
        if limit is not None:
            items = items[:limit]
        out = []
        for item in items:
            row = dataclasses.asdict(item)
            for k, v in row.items():
                if k in ("first_seen", "last_seen", "updated_at", "first_listed", "excluded_at", "since"):
                    row[k] = iso(v)
                elif isinstance(v, tuple | list):
                    row[k] = list(v)
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "generated_at": iso(self.generated_at),
            "days": self.days,
            "users_source": self.users_source,
            "accounts": {
                "by_state": dict(self.by_state),
                "total": sum(self.by_state.values()),
                "by_domain": {d: dict(s) for d, s in self.by_domain.items()},
            },
            **{s: self.rows(s) for s in SECTIONS if s not in ("accounts", "readiness")},
            "readiness": {"ready": self.readiness.ready, "reasons": list(self.readiness.reasons)},
        }


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


def _base(address: str, accounts: dict[str, Account], delimiter: str = "+") -> str:
    """user+ext@domain counts for user@domain unless user+ext@domain is itself an account."""
    if address in accounts or not delimiter:
        return address
    local, _, domain = address.rpartition("@")
    cut = local.find(delimiter)
    return f"{local[:cut]}@{domain}" if cut > 0 else address


def _list_address(list_id: str, domains: frozenset[str]) -> str:
    """The address a List-Id names, when it is one of ours: "Team <team.example.org>" -> team@example.org."""
    text = list_id.strip()
    if "<" in text and ">" in text:
        text = text[text.rfind("<") + 1 : text.rfind(">")]
    text = text.strip().lower()
    for domain in sorted(domains, key=len, reverse=True):
        if text.endswith("." + domain) and len(text) > len(domain) + 1:
            return f"{text[: -len(domain) - 1]}@{domain}"
    return ""


def _auto_kind(r: MessageRecord) -> str:
    auto = r.auto_submitted.strip().lower()
    prec = r.precedence.strip().lower()
    if auto.startswith("auto-replied") or prec in AUTO_REPLY_PRECEDENCE:
        return "auto-reply"
    if (auto and auto != "no") or prec in BULK_PRECEDENCE:
        return "auto-generated"
    return ""


def is_legacy_route(route: str, cfg: Config) -> bool:
    t = cfg.target.legacy_transport
    return route == t or route.startswith(t + ":")


def build_report(
    cfg: Config,
    store: Store,
    *,
    days: int = 7,
    now: float | None = None,
    users: Iterable[str] | None = None,
    users_source: str = "",
) -> Report:
    """The report. `users`: the legacy server's user list when known (addresses missing from it are aliases)."""
    now = time.time() if now is None else now
    domains = frozenset(d.lower() for d in cfg.mail.domains)
    accounts = {a.address: a for a in store.accounts()}
    legacy_users = None if users is None else {u.lower() for u in users}
    aliases = {a.alias: a for a in store.aliases()}
    log = store.message_log_since(0.0)
    since = now - days * DAY

    # accounts per state and per domain
    by_state = store.summary()
    by_domain: dict[str, dict[str, int]] = {}
    for d in sorted({*domains, *(_domain(a) for a in accounts)}):
        by_domain[d] = {s.value: 0 for s in State}
    for a in accounts.values():
        by_domain[_domain(a.address)][a.state.value] += 1

    # traffic per recipient of our domains; List-Ids the legacy server sent out
    traffic: dict[str, Traffic] = {}
    legacy_lists: dict[str, str] = {}  # list address -> List-Id seen on mail from the legacy server
    for r in log:
        rcpt = _base(r.recipient.lower(), accounts)
        if _domain(rcpt) in domains:
            traffic.setdefault(rcpt, Traffic()).add(r)
        if r.from_legacy and r.list_id:
            addr = _list_address(r.list_id, domains)
            if addr:
                legacy_lists.setdefault(addr, r.list_id)

    def never_logged_in(address: str) -> bool:
        a = accounts.get(address)
        return a is None or a.state is State.DISCOVERED or a.last_login_at is None

    dormant: list[Dormant] = []
    suspected: list[SuspectedAlias] = []
    candidates = sorted((set(traffic) | set(legacy_lists)) - set(aliases))
    for address in candidates:
        if not never_logged_in(address):
            continue
        t = traffic.get(address, Traffic())
        acc = accounts.get(address)
        evidence: list[str] = []
        kind = ""
        if address in legacy_lists:
            kind = "list"
            evidence.append(f"List-Id {legacy_lists[address]} on mail from the legacy server")
        local = address.rpartition("@")[0]
        if local in ROLE_NAMES:
            kind = kind or "alias"
            evidence.append("role address (RFC 2142)")
        if legacy_users is not None and address not in legacy_users:
            kind = kind or "alias"
            evidence.append(f"not in the legacy user list ({users_source or 'given'})")
        if kind and (acc is None or acc.state is State.DISCOVERED):
            if t.messages:
                evidence.append("the legacy server accepts mail for it; nobody ever logged in")
            suspected.append(SuspectedAlias(address, kind, t.messages, t.bytes, t.last_seen, tuple(evidence)))
        elif t.messages:
            state = acc.state.value if acc else ""
            dormant.append(Dormant(address, state, t.messages, t.bytes, t.first_seen, t.last_seen))
    dormant.sort(key=lambda d: (-d.messages, d.address))

    # rules that ran on the legacy server
    groups: dict[tuple[str, str, str], tuple[int, float, str]] = {}
    for r in log:
        if not r.from_legacy:
            continue
        kind = _auto_kind(r)
        detail = "; ".join(
            x for x in (r.auto_submitted and f"Auto-Submitted: {r.auto_submitted}",
                        r.precedence and f"Precedence: {r.precedence}") if x
        )  # fmt: skip
        if not kind:
            if r.list_id or _domain(r.sender.lower()) in domains or not r.sender:
                continue  # list mail, or our own users' outgoing mail relayed by the legacy server
            kind, detail = "forward", "re-sent by the legacy server"
        key = (kind, r.sender.lower(), r.recipient.lower())
        n, last, _ = groups.get(key, (0, 0.0, detail))
        groups[key] = (n + 1, max(last, r.at), detail)
    auto_rules = [AutoRule(k[0], k[1], k[2], n, last, detail) for k, (n, last, detail) in groups.items()]
    for e in store.events(limit=100_000, kind="sweep-hit"):
        if e.kind == "sweep-hit":
            count = e.detail.split(" ", 1)[0]  # "3 message(s) arrived on the legacy server after ..."
            auto_rules.append(
                AutoRule("sweep-hit", "", e.address, int(count) if count.isdigit() else 1, e.at, e.detail)
            )
    auto_rules.sort(key=lambda x: (x.kind, -x.messages, x.sender, x.recipient))

    failures = [
        Failure(a.address, a.state.value, a.attempts, a.last_error, a.updated_at)
        for a in accounts.values()
        if a.state is State.FAILED or (a.last_error and a.state in (State.COPYING, State.CUTOVER))
    ]

    # what still goes to the legacy server
    recent: dict[str, Traffic] = {}
    for r in log:
        if r.at < since or not is_legacy_route(r.route, cfg):
            continue
        rcpt = r.recipient.lower()
        alias = aliases.get(_base(rcpt, accounts)) or aliases.get(rcpt)
        if alias is not None and r.at >= alias.created_at:
            continue  # Postfix expanded it here (smtpd logged the route before the alias was rewritten)
        if inventory.is_migrated_before(accounts.get(_base(rcpt, accounts)), r.at):
            continue  # relayed before the account migrated: its copy took the message along
        recent.setdefault(rcpt, Traffic()).add(r)
    legacy_traffic = [
        LegacyTraffic(
            rcpt,
            accounts[_base(rcpt, accounts)].state.value if _base(rcpt, accounts) in accounts else "",
            t.messages,
            t.bytes,
            t.last_seen,
        )
        for rcpt, t in recent.items()
    ]
    legacy_traffic.sort(key=lambda x: (-x.messages, x.recipient))

    # the inventory: accounts the legacy server (LDAP, a file) lists that nobody has seen; exclusions
    exclusions = store.exclusions()
    excluded_set = {x.address for x in exclusions}
    never_listed = inventory.never_seen(store, accounts.values())
    never = [NeverSeen(n.address, n.sources, n.first_listed) for n in never_listed]
    shared = [SharedFolder(e.name, e.source, e.detail) for e in store.inventory(inventory.SHARED_FOLDER)]

    # the verdict
    reasons: list[str] = []
    unmigrated: dict[str, int] = {}
    for a in accounts.values():
        if a.state is not State.MIGRATED and a.address not in excluded_set:
            unmigrated[a.state.value] = unmigrated.get(a.state.value, 0) + 1
    unmigrated = {s.value: unmigrated[s.value] for s in State if s.value in unmigrated}
    if unmigrated:
        detail = ", ".join(f"{n} {s}" for s, n in unmigrated.items())
        reasons.append(f"{sum(unmigrated.values())} account(s) not migrated ({detail})")
    unknown = [d for d in dormant if not d.state and d.address not in excluded_set]
    if unknown:
        reasons.append(f"{len(unknown)} address(es) receive mail but have no account here (dormant: migrate them)")
    blocking_failures = [f for f in failures if f.address not in excluded_set]
    if blocking_failures:
        reasons.append(f"{len(blocking_failures)} account(s) with copy failures")
    blocking_traffic = [x for x in legacy_traffic if x.recipient not in excluded_set
                        and _base(x.recipient, accounts) not in excluded_set]  # fmt: skip
    if blocking_traffic:
        n = sum(x.messages for x in blocking_traffic)
        reasons.append(
            f"{n} message(s) to {len(blocking_traffic)} recipient(s) went to the legacy server in the last "
            f"{days} day(s)"
        )
    if suspected:
        reasons.append(f"{len(suspected)} suspected alias(es) or list(s) not recreated (autoport alias add)")
    hits = [x for x in auto_rules if x.kind == "sweep-hit" and x.last_seen >= since]
    if hits:
        n = sum(x.messages for x in hits)
        reasons.append(f"{n} message(s) reached legacy mailboxes after cutover in the last {days} day(s)")
    reasons += inventory.readiness_reasons(store, list(accounts.values()), excluded_set, never_listed)
    sweeps = [SweepBlocked(b.address, b.reason, b.since) for b in store.sweep_blocks()
              if b.address in accounts and accounts[b.address].state is State.MIGRATED]  # fmt: skip
    if sweeps:
        reasons.append(
            f"{len(sweeps)} migrated account(s) cannot be swept (mail reaching their legacy mailbox would go "
            f"unnoticed): {sweeps[0].reason}"
        )
    hashless = [a for a in accounts.values() if a.state is State.MIGRATED and not a.has_password]
    if hashless:
        reasons.append(
            f"{len(hashless)} migrated account(s) have no password yet: their first login is checked on the "
            "legacy server (autoport passwd / import-hashes)"
        )
    return Report(
        generated_at=now,
        days=days,
        users_source=users_source,
        by_state=by_state,
        by_domain=by_domain,
        dormant=dormant,
        aliases=suspected,
        auto_rules=auto_rules,
        failures=failures,
        legacy_traffic=legacy_traffic,
        readiness=Readiness(not reasons, tuple(reasons)),
        never_seen=never,
        excluded=[Excluded(x.address, x.reason, x.created_at) for x in exclusions],
        shared_folders=shared,
        sweeps=sweeps,
    )
