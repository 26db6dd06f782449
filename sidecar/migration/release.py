"""Releasing held mail: when an account leaves ``cutover``, its deferred mail is delivered within seconds.

More (the reasons and limits behind this module): docs/modules.md, sidecar/migration/release.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable

from sidecar.auth.routing import HOLD_REASON, PROBE_DOMAIN
from sidecar.config import Config
from sidecar.mta import commands
from sidecar.states import is_held
from sidecar.store.base import Store

log = logging.getLogger("autoport.release")

COMMAND_TIMEOUT = 30.0  # seconds for one postqueue/sendmail/postsuper run
PROBE_TIMEOUT = 10.0  # seconds the probe may take to leave the incoming/active queues
SETTLE_TIMEOUT = 10.0  # seconds we watch released mail leave the deferred queue
POLL = 0.02  # seconds between queue listings while waiting
_probe_seq = itertools.count(1)


class ReleaseError(Exception):
    """Postfix's queue tools failed (not running, no permission): the held mail stays queued, nothing is lost."""


@dataclasses.dataclass(frozen=True)
class QueuedMessage:
    queue_id: str
    queue_name: str  # maildrop, incoming, active, deferred, hold, corrupt
    recipients: tuple[tuple[str, str], ...]  # (address, delay_reason) of the recipients not yet delivered


@dataclasses.dataclass
class ReleaseReport:
    """What one release did (for logs, metrics and tests)."""

    released: dict[str, int] = dataclasses.field(default_factory=dict)  # address -> held messages flushed
    queue_ids: list[str] = dataclasses.field(default_factory=list)
    still_held: list[str] = dataclasses.field(default_factory=list)  # deferred again after the flush
    probe: bool = False
    seconds: float = 0.0


def _postfix_args(cfg: Config, tool: str) -> list[str]:
    return commands.postfix_argv(cfg.target.postfix_config, tool)


def _run(args: list[str], *, stdin: bytes = b"") -> bytes:
    try:
        return commands.run(args, stdin=stdin, timeout=COMMAND_TIMEOUT).stdout
    except commands.CommandError as e:
        raise ReleaseError(str(e)) from None


def list_queue(cfg: Config) -> list[QueuedMessage]:
    """Every message in the queue (``postqueue -j``), with its undelivered recipients."""
    out = _run([*_postfix_args(cfg, "postqueue"), "-j"])
    messages = []
    for line in out.splitlines():
        if not line.strip():
            continue
        try:
            m = json.loads(line)
            rcpts = tuple((str(r.get("address", "")), str(r.get("delay_reason", ""))) for r in m["recipients"])
            messages.append(QueuedMessage(str(m["queue_id"]), str(m["queue_name"]), rcpts))
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("release: unexpected postqueue -j line %r", line[:200])
    return messages


class _Matcher:
    """Recipient address -> account address, the way sidecar.auth.routing folds it (case, +extension)."""

    def __init__(self, cfg: Config, addresses: Iterable[str], delimiters: str = "+") -> None:
        self.lowercase = cfg.mail.lowercase
        self.delimiters = delimiters
        self.addresses = {self._fold(a): a for a in addresses}

    def _fold(self, address: str) -> str:
        local, _, domain = address.rpartition("@")
        return f"{local.lower() if self.lowercase else local}@{domain.lower().rstrip('.')}"

    def account(self, recipient: str) -> str | None:
        folded = self._fold(recipient)
        if folded in self.addresses:
            return self.addresses[folded]
        local, _, domain = folded.rpartition("@")
        cut = min((i for i in (local.find(d) for d in self.delimiters) if i > 0), default=-1)
        if cut > 0:
            return self.addresses.get(f"{local[:cut]}@{domain}")
        return None


def _held(messages: list[QueuedMessage], matcher: _Matcher) -> dict[str, set[str]]:
    """queue id -> accounts it holds mail for (deferred with the hold reason)."""
    held: dict[str, set[str]] = {}
    for m in messages:
        if m.queue_name != "deferred":
            continue
        for rcpt, reason in m.recipients:
            account = matcher.account(rcpt)
            if account is not None and reason == HOLD_REASON:
                held.setdefault(m.queue_id, set()).add(account)
    return held


def _send_probe(cfg: Config) -> str:
    """Submit the cache-busting probe (null sender, discarded by the transport map); its recipient."""
    rcpt = f"release-{os.getpid()}-{next(_probe_seq)}-{time.monotonic_ns()}@{PROBE_DOMAIN}"
    body = f"Subject: autoport release probe\nAuto-Submitted: auto-generated\n\n{rcpt}\n".encode()
    _run([*_postfix_args(cfg, "sendmail"), "-f", "", "-N", "never", "--", rcpt], stdin=body)
    return rcpt


def _wait_probe(cfg: Config, rcpt: str, timeout: float) -> list[QueuedMessage]:
    """Wait until qmgr has resolved the probe (it left maildrop/incoming/active); the last listing."""
    deadline = time.monotonic() + timeout
    while True:
        messages = list_queue(cfg)
        mine = [m for m in messages if any(r == rcpt for r, _ in m.recipients)]
        pending = [m for m in mine if m.queue_name in ("maildrop", "incoming", "active")]
        if not pending:
            # deferred: the map did not answer (sidecar down); qmgr resolved it all the same. Drop it.
            for m in mine:
                _delete(cfg, m.queue_id, m.queue_name)
            return messages
        if time.monotonic() > deadline:
            log.warning("release: the probe %s is still queued after %.0f s; flushing anyway", rcpt, timeout)
            return messages
        time.sleep(POLL)


def _delete(cfg: Config, queue_id: str, queue_name: str) -> None:
    try:
        _run([*_postfix_args(cfg, "postsuper"), "-d", queue_id, queue_name])
    except ReleaseError as e:
        log.warning("release: could not delete the probe %s: %s", queue_id, e)


def _flush(cfg: Config, queue_ids: Iterable[str]) -> None:
    for qid in queue_ids:
        try:
            _run([*_postfix_args(cfg, "postqueue"), "-i", qid])
        except ReleaseError as e:  # delivered or expired meanwhile: nothing to do
            log.info("release: postqueue -i %s: %s", qid, e)


def _settle(cfg: Config, held: dict[str, set[str]], matcher: _Matcher, timeout: float) -> list[str]:
    """Watch the flushed messages until none waits in incoming/active; the ones deferred again (held)."""
    deadline = time.monotonic() + timeout
    while True:
        messages = [m for m in list_queue(cfg) if m.queue_id in held]
        if not any(m.queue_name in ("incoming", "active") for m in messages) or time.monotonic() > deadline:
            return sorted(_held(messages, matcher))
        time.sleep(POLL)


def clear_resolve_cache(cfg: Config) -> list[QueuedMessage]:
    """Make qmgr resolve every address again from now on (one probe through it); the queue listing taken once
    the probe has passed. Used at cutover too (sidecar.migration.cutover), before the final delta."""
    return _wait_probe(cfg, _send_probe(cfg), PROBE_TIMEOUT)


def in_flight(cfg: Config, address: str, messages: list[QueuedMessage]) -> list[str]:
    """Queue ids of messages for the account in the active queue (resolved, being delivered)."""
    matcher = _Matcher(cfg, [address])
    return [m.queue_id for m in messages if m.queue_name == "active" and any(matcher.account(r) for r, _ in
                                                                             m.recipients)]  # fmt: skip


def release_held_many(
    cfg: Config,
    store: Store | None,
    addresses: Iterable[str],
    *,
    wait: bool = True,
    probe: bool = True,
    settle_timeout: float = SETTLE_TIMEOUT,
) -> ReleaseReport:
    """Deliver the held mail of these accounts now: one listing, one probe, one flush per held message.

    Accounts the store still has in cutover are skipped (pass store=None to skip the check). With wait, the
    call returns once the flushed messages have left the active queue (delivered, or deferred for another
    reason such as the legacy server being down); a message deferred again with the hold reason is flushed
    once more after a second probe, and reported in still_held if that fails too. Raises ReleaseError when
    Postfix's tools fail; the mail stays queued and goes out at the next queue run.
    """
    t0 = time.monotonic()
    report = ReleaseReport(probe=False)
    wanted = sorted(set(addresses))
    if store is not None:
        skipped = [a for a in wanted if is_held(store.state_of(a))]
        if skipped:
            log.warning("release: %s still in cutover; their mail stays held", ", ".join(skipped))
        wanted = [a for a in wanted if a not in skipped]
    if not wanted:
        return report
    matcher = _Matcher(cfg, wanted)
    held = _held(list_queue(cfg), matcher)
    for attempt in (1, 2):
        if not held:
            break
        if probe:
            report.probe = True
            rcpt = _send_probe(cfg)
            # the listing taken once the probe is through is the freshest view of what is held
            held = _held(_wait_probe(cfg, rcpt, PROBE_TIMEOUT), matcher) or held
        _flush(cfg, sorted(held))
        if attempt == 1:
            report.queue_ids = sorted(held)
            for accounts in held.values():
                for a in accounts:
                    report.released[a] = report.released.get(a, 0) + 1
        if not wait:
            break
        again = _settle(cfg, held, matcher, settle_timeout)
        report.still_held = again
        held = {q: held[q] for q in again}
    report.seconds = time.monotonic() - t0
    log.info("release: %d held message(s) of %d account(s) flushed in %.0f ms%s",
             len(report.queue_ids), len(report.released), report.seconds * 1000,
             f"; still held: {', '.join(report.still_held)}" if report.still_held else "")  # fmt: skip
    return report


def release_held(cfg: Config, store: Store | None, address: str, *, wait: bool = True) -> int:
    """Deliver one account's held mail now (see release_held_many); the number of messages flushed."""
    return release_held_many(cfg, store, [address], wait=wait).released.get(address, 0)
