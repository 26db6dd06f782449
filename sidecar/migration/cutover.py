"""The cutover handshake: before the final delta reads the legacy mailbox, nothing may still write to it.

kick_everywhere() stores a kick request and waits until every live node acknowledged it; each node's NodeAgent
clears its Postfix route cache, waits out in-flight mail, kicks the account's proxied sessions and checks none
is left. A node that does not confirm in time raises KickTimeout: the runner sends the account back to legacy.

flush_everywhere() uses the same table for another kind of request, "flush": every node forgets an account's
entries in Dovecot's auth cache (its state, password or logins changed), so no node answers from a stale one.

More (the reasons and limits behind this module): docs/modules.md, sidecar/migration/cutover.py.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sidecar.config import Config
from sidecar.mta import commands
from sidecar.store.base import Kick, Store, StoreError

log = logging.getLogger("sidecar.migration.cutover")

HEARTBEAT = 1.0  # seconds between a node's heartbeats (and looks at the kick requests)
KICK_WINDOW = 600.0  # kick requests older than this are not carried out any more (the cutover is long over)
KICK_ROUNDS = 3  # doveadm proxy kick + list rounds on one node before it reports sessions it could not close
POLL = 0.05
RETRY_FIRST = 1.0  # seconds before a node tries a kick request it could not carry out again; doubled each time
RETRY_MAX = 30.0  # ... up to this: a node whose Dovecot is down runs no doveadm per request per heartbeat


def node_id(cfg: Config) -> str:
    """This node's name: its host and the Dovecot instance whose proxied sessions it closes. Stable across
    restarts, so a sidecar that comes back carries out the kick requests it missed."""
    return f"{socket.gethostname()}:{cfg.target.dovecot_config or 'dovecot'}"


class KickTimeout(Exception):
    """Not every live node confirmed the kick in time: the cutover must not read the legacy mailbox now."""


# --- what a node does for one kick request --------------------------------------------------------------------


def _doveadm(cfg: Config) -> list[str]:
    """doveadm reading the running Dovecot's configuration (its config socket: no doveconf run per command)."""
    return commands.doveadm_argv(cfg.target.doveadm, cfg.target.dovecot_config, running=True)


def proxied_logins(cfg: Config) -> collections.Counter[str]:
    """Login name (lower case) -> how many sessions this node's Dovecot proxies for it (``doveadm proxy list``)."""
    p = subprocess.run([*_doveadm(cfg), "proxy", "list"], capture_output=True, timeout=10, check=False, text=True)
    if p.returncode != 0:
        raise OSError(f"doveadm proxy list: exit {p.returncode}: {p.stderr.strip()[-200:]}")
    counts: collections.Counter[str] = collections.Counter()
    for line in p.stdout.splitlines()[1:]:  # header: username proto src ip dest ip port (none when empty)
        fields = line.split()
        if fields:
            counts[fields[0].lower()] += 1
    return counts


def sessions_of(listing: collections.Counter[str], logins: tuple[str, ...]) -> int:
    return sum(listing[x] for x in {x.lower() for x in logins})


def proxied_sessions(cfg: Config, logins: tuple[str, ...]) -> int:
    """How many proxied sessions of these logins this node's Dovecot has (``doveadm proxy list``)."""
    return sessions_of(proxied_logins(cfg), logins)


@dataclass(frozen=True)
class Session:
    """One line of ``doveadm -f tab who -1``: a user's session in one Dovecot process."""

    user: str
    service: str
    pid: int
    dest_ip: str  # filled for a session a login process proxies (Dovecot 2.4)

    @property
    def proxied(self) -> bool:
        return bool(self.dest_ip) and self.service.endswith("-login")


def parse_who(text: str) -> list[Session] | None:
    """The sessions in ``doveadm -f tab who -1`` output, or None when it cannot tell proxied sessions apart.

    Dovecot 2.4 prints the columns ``username service pid ip dest_ip`` (dest_ip filled when a login process
    proxies the session); 2.3 prints ``username proto pid ip``, without dest_ip: None. Columns are found by
    their header name; a line whose pid is not a number is skipped.
    """
    lines = text.splitlines()
    if not lines:
        return None
    header = [h.strip().lower() for h in lines[0].split("\t")]
    if "dest_ip" not in header or "username" not in header or "pid" not in header:
        return None
    col = {name: i for i, name in enumerate(header)}
    service = col.get("service", col.get("proto"))
    sessions = []
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) < len(header):
            fields += [""] * (len(header) - len(fields))
        pid = fields[col["pid"]].strip()
        if not pid.isdigit():
            continue
        sessions.append(Session(
            user=fields[col["username"]].strip(),
            service=fields[service].strip() if service is not None else "",
            pid=int(pid),
            dest_ip=fields[col["dest_ip"]].strip(),
        ))  # fmt: skip
    return sessions


def login_processes(sessions: list[Session], logins: tuple[str, ...]) -> tuple[list[int], list[int]]:
    """The login processes proxying sessions of these logins: (pids serving only them, which may be ended;
    pids also serving another user, which must not be). Dovecot's default (``restart_request_count = 1``
    for imap-login/pop3-login, 2.3's ``service_count = 1``) runs one process per connection; in
    high-performance mode one process serves many users, and ending it would cut them all."""
    wanted = {x.lower() for x in logins}
    mine = {s.pid for s in sessions if s.proxied and s.user.lower() in wanted}
    shared = {s.pid for s in sessions if s.pid in mine and s.user.lower() not in wanted}
    return sorted(mine - shared), sorted(shared)


def who(cfg: Config) -> list[Session] | None:
    """This node's sessions (``doveadm -f tab who -1``); None on Dovecot 2.3 (no dest_ip column)."""
    p = subprocess.run([*_doveadm(cfg), "-f", "tab", "who", "-1"], capture_output=True, timeout=10, check=False,
                       text=True)  # fmt: skip
    if p.returncode != 0:
        raise OSError(f"doveadm who: exit {p.returncode}: {p.stderr.strip()[-200:]}")
    return parse_who(p.stdout)


def _is_login_process(pid: int, service: str) -> bool:
    """pid still runs this login service (not a process that took the number after it exited)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == service
    except OSError:
        return False


def end_login_processes(sessions: list[Session], logins: tuple[str, ...]) -> tuple[list[int], list[int]]:
    """SIGTERM the login processes that proxy only these logins (the proxied session ends at once: "Disconnected
    by proxy: Process shutting down"); (pids signalled, pids left alone because they serve another user too).
    Needs CAP_KILL when the sidecar is not root (login processes run as dovenull)."""
    alone, shared = login_processes(sessions, logins)
    service = {s.pid: s.service for s in sessions}
    ended = []
    for pid in alone:
        if _is_login_process(pid, service[pid]):
            os.kill(pid, signal.SIGTERM)
            ended.append(pid)
    return ended, shared


def _gone(pids: list[int], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(POLL)


def _left(cfg: Config, logins: tuple[str, ...]) -> tuple[int, list[Session] | None]:
    """How many proxied sessions of these logins are open, and this node's sessions when ``doveadm who`` tells
    proxied ones apart (2.4: its ``proxy list`` also names local sessions); None on 2.3."""
    left = proxied_sessions(cfg, logins)
    if not left:
        return 0, None
    sessions = who(cfg)
    if sessions is None:
        return left, None
    wanted = {x.lower() for x in logins}
    return sum(1 for s in sessions if s.proxied and s.user.lower() in wanted), sessions


def kick_sessions(cfg: Config, logins: tuple[str, ...], *, open_now: int | None = None) -> str:
    """Close this node's proxied sessions of these logins; raises OSError when some stay open.

    ``doveadm proxy kick`` ends them on Dovecot 2.3. On 2.4.1 it answers "1 connections kicked" and ends
    nothing when a login process serves one connection (the default: such a process is kicked by a signal it
    ignores, as it never records the proxied user as its current one), so the sessions ``doveadm who`` still shows
    proxied are ended with their login process (end_login_processes), when that process serves this account
    only. One that also serves another user is left running: no acknowledgement then, the cutover fails
    toward legacy and is retried.

    The list comes first: with no proxied session of these logins open (most accounts of a bulk migration),
    that one ``doveadm proxy list`` is all; each doveadm run costs 4-5 ms of CPU on 2.3 and 10-15 ms on 2.4
    even with the running instance's config socket (_doveadm), and a cutover asks every node twice. ``proxy kick`` and
    ``proxy list`` see the same sessions (both walk the login processes' established and pending proxies, over
    Dovecot's ipc socket), so nothing the kick could close is missed. open_now: that count, from a listing the
    caller made after the request (carry_out: one listing for every request of a tick).
    """
    if not (proxied_sessions(cfg, logins) if open_now is None else open_now):
        return "no proxied session open"
    ended: list[int] = []
    shared: list[int] = []
    for _round in range(KICK_ROUNDS):
        subprocess.run([*_doveadm(cfg), "proxy", "kick", *logins], capture_output=True, timeout=10, check=False)
        left, sessions = _left(cfg, logins)
        if not left:
            break
        now: list[int] = []
        if sessions is not None:
            now, shared = end_login_processes(sessions, logins)
            ended += now
        if now:
            _gone(now)
        else:
            time.sleep(0.2)
    else:
        left, _ = _left(cfg, logins)
        if left:
            why = f" (login process(es) {', '.join(map(str, shared))} also serve other users)" if shared else ""
            raise OSError(f"{left} proxied session(s) of {', '.join(logins)} still open after {KICK_ROUNDS} "
                          f"kicks{why}")  # fmt: skip
    if ended:
        return f"no proxied session left ({len(ended)} login process(es) ended: {', '.join(map(str, ended))})"
    return "no proxied session left"


def clear_route_cache(cfg: Config, addresses: list[str], timeout: float = 10.0) -> str:
    """Make this node's Postfix resolve these accounts again, and wait until no message for them is in flight.

    One release probe pushes every address out of qmgr's resolve cache: every message that enters the active
    queue from then on is resolved again (retry:, held). The ones already in the active queue when the probe
    had passed may have been resolved before, toward the legacy server: wait until those are gone (delivered,
    or deferred). New mail arriving meanwhile is not waited for (a steady stream would otherwise keep the
    active queue busy forever). One probe and one listing loop for all the accounts cutting over at once.
    """
    from sidecar.migration import release

    listing = release.clear_resolve_cache(cfg)
    before = {q for a in addresses for q in release.in_flight(cfg, a, listing)}
    deadline = time.monotonic() + timeout
    while before:
        listing = release.list_queue(cfg)
        active = before & {q for a in addresses for q in release.in_flight(cfg, a, listing)}
        if not active:
            break
        if time.monotonic() > deadline:
            raise OSError(f"mail for {', '.join(addresses)} still in the active queue: {', '.join(sorted(active))}")
        time.sleep(POLL)
    return f"route cache cleared, {len(before)} message(s) in flight waited for"


# Dovecot's auth master reads lines of at most 1024 bytes and silently drops a longer one (doveadm still exits
# 0): the names of one `doveadm auth cache flush` stay below this many bytes ("CACHE-FLUSH\tID\t" included).
FLUSH_LINE_BYTES = 900


def flush_groups(names: list[str] | tuple[str, ...], limit: int = FLUSH_LINE_BYTES) -> list[list[str]]:
    """The names split into groups whose CACHE-FLUSH line (tab-separated, with its prefix) fits in `limit`
    bytes; a name too long for any line is left out (Dovecot refuses such a login name anyway)."""
    prefix = len("CACHE-FLUSH\t4294967295")
    groups: list[list[str]] = []
    current: list[str] = []
    size = prefix
    for name in dict.fromkeys(n.lower() for n in names if n):
        n = len(name.encode()) + 1
        if prefix + n > limit:
            log.warning("auth cache flush: a name of %d bytes is longer than a flush line; skipped", n - 1)
            continue
        if size + n > limit:
            groups.append(current)
            current, size = [], prefix
        current.append(name)
        size += n
    if current:
        groups.append(current)
    return groups


def flush_auth_cache(cfg: Config, names: list[str] | tuple[str, ...]) -> str:
    """Forget these login names in this node's Dovecot auth cache (``doveadm auth cache flush``, in groups that
    fit one line; no names: every entry); raises OSError when doveadm fails."""
    groups = flush_groups(names) if names else [[]]  # no name at all: the whole cache
    for group in groups:
        try:
            commands.auth_cache_flush(cfg.target.doveadm, cfg.target.dovecot_config, *group)
        except commands.CommandError as e:
            raise OSError(f"doveadm auth cache flush: {e}") from None
    return f"auth cache flushed for {sum(len(g) for g in groups)} name(s)"


def carry_out(cfg: Config, kicks: list[Kick]) -> dict[int, str]:
    """Everything one node does for the kick requests it found (one route-cache probe for all of them); kick id
    -> what was done. Raises (OSError, ReleaseError) when the route cache could not be cleared: no request is
    confirmed then. A request whose sessions could not be closed is left out (not confirmed). Flush requests
    (kind "flush") only flush Dovecot's auth cache; one that fails is left out too (the next tick tries again)."""
    done: dict[int, str] = {}
    flushes = [k for k in kicks if k.kind == "flush"]
    if flushes:
        # one `doveadm auth cache flush` for the names of every request found together (a bulk migration
        # finds several per tick), split only where Dovecot's line length demands it; an empty request stands
        # for the whole cache
        whole = any(not k.logins for k in flushes)
        try:
            what = flush_auth_cache(cfg, [] if whole else [n for k in flushes for n in k.logins])
        except OSError as e:
            log.warning("auth cache flush %s for %s: %s", ", ".join(str(k.id) for k in flushes),
                        ", ".join(sorted({k.address for k in flushes})), e)  # fmt: skip
        else:
            done |= {k.id: what for k in flushes}
    kicks = [k for k in kicks if k.kind != "flush"]
    if not kicks:
        return done
    route = clear_route_cache(cfg, sorted({k.address for k in kicks}))
    try:
        listing = proxied_logins(cfg)  # one listing for every request of this tick (most need no kick)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("kick %s: %s", ", ".join(str(k.id) for k in kicks), e)
        return done
    for kick in kicks:
        try:
            closed = kick_sessions(cfg, kick.logins, open_now=sessions_of(listing, kick.logins))
            done[kick.id] = f"{route}; {closed}"
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("kick %d for %s: %s", kick.id, kick.address, e)
    return done


class NodeAgent:
    """One per sidecar: heartbeat, and every kick request carried out and acknowledged."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        *,
        node: str = "",
        act: Callable[[Config, list[Kick]], dict[int, str]] = carry_out,
        interval: float = HEARTBEAT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.node = node or node_id(cfg)
        self.act = act
        self.interval = interval
        self.stopping = threading.Event()
        self.wakeup = threading.Event()
        self.thread: threading.Thread | None = None
        self.failed: dict[str, str] = {}  # the last failed batch (kick ids) -> its error, logged once
        self.clock = clock
        self.retry: dict[int, tuple[float, float]] = {}  # kick id not carried out -> (next try, wait after it)

    def start(self) -> None:
        self.tick()  # live before the first job: a runner on this node waits for us
        self.thread = threading.Thread(target=self._loop, name="node-agent", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        self.wakeup.set()
        if self.thread:
            self.thread.join(timeout)

    def poke(self) -> None:
        self.wakeup.set()

    def _loop(self) -> None:
        if self.act is carry_out:
            # flush requests older than KICK_WINDOW are not carried out: a node back after longer forgets all
            try:
                flush_auth_cache(self.cfg, [])
                log.info("node %s: Dovecot's auth cache flushed (start-up)", self.node)
            except OSError as e:
                log.warning("node %s: Dovecot's auth cache not flushed at start-up: %s", self.node, e)
        while not self.stopping.is_set():
            self.tick()
            self.wakeup.wait(self.interval)
            self.wakeup.clear()

    def tick(self) -> None:
        """One heartbeat and one look at the kick requests (errors logged; the next tick tries again)."""
        try:
            self.store.node_heartbeat(self.node)
            kicks = self.store.pending_kicks(self.node, time.time() - KICK_WINDOW)
        except StoreError as e:
            log.warning("node %s: store unavailable (%s)", self.node, e)
            return
        now = self.clock()
        pending = {k.id for k in kicks}
        self.retry = {i: r for i, r in self.retry.items() if i in pending}  # acked elsewhere, or too old now
        kicks = [k for k in kicks if self.retry.get(k.id, (now, 0.0))[0] <= now]  # new ones, and retries due
        if not kicks:
            return
        key = ",".join(str(k.id) for k in kicks)
        try:
            done = self.act(self.cfg, kicks)
        except Exception as e:  # no ack: the runner times out and fails toward legacy
            if self.failed.get(key) != str(e):
                log.warning("node %s: kicks for %s failed: %s", self.node, ", ".join(k.address for k in kicks), e)
            self.failed = {key: str(e)}
            self._back_off(kicks, now)
            return
        self.failed = {}
        self._back_off([k for k in kicks if k.id not in done], now)
        for kick in kicks:
            if kick.id not in done:
                continue
            with contextlib.suppress(StoreError):
                self.store.ack_kick(kick.id, self.node, done[kick.id])
                log.info("node %s: kick %d for %s done (%s)", self.node, kick.id, kick.address, done[kick.id])

    def _back_off(self, kicks: list[Kick], now: float) -> None:
        """Try these again after RETRY_FIRST, then twice as long each time up to RETRY_MAX (a new request is tried
        at once): a node whose doveadm keeps failing does not run it for every pending request at every
        heartbeat for KICK_WINDOW, nor log each failure every second."""
        for kick in kicks:
            wait = min(max(RETRY_FIRST, 2 * self.retry.get(kick.id, (0.0, 0.0))[1]), RETRY_MAX)
            self.retry[kick.id] = (now + wait, wait)


# --- the runner's side ----------------------------------------------------------------------------------------


def kick_everywhere(
    store: Store,
    address: str,
    logins: list[str],
    *,
    timeout: float,
    node_timeout: float,
    stopping: threading.Event | None = None,
    poke: Callable[[], None] | None = None,
) -> dict[str, str]:
    """Ask every node to kick the account and wait until every live node confirmed; node -> what it did.

    Raises KickTimeout when a live node did not confirm within `timeout` (nodes that stop heartbeating
    meanwhile are not waited for), InterruptedError when `stopping` is set.
    """
    kick = store.request_kick(address, logins)
    if poke is not None:
        poke()
    deadline = time.monotonic() + timeout
    while True:
        acks = store.kick_acks(kick.id)
        live = set(store.live_nodes(node_timeout))
        missing = sorted(live - set(acks))
        if not missing:
            return acks
        if time.monotonic() > deadline:
            raise KickTimeout(f"node(s) {', '.join(missing)} did not confirm closing the sessions of {address}")
        if stopping is not None and stopping.wait(POLL):
            raise InterruptedError("sidecar stopping")
        if stopping is None:
            time.sleep(POLL)


def account_names(store: Store, address: str, logins: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Every name Dovecot's sql steps answer for this account (dovecot_* views): its address, its logins and
    those of the login map (`autoport import-users`: the legacy login and the extra addresses)."""
    names = {address, *logins}
    account = store.get(address)
    if account is not None:
        names |= set(account.logins)
    imported = store.find_imported(address)
    if imported is not None:
        names |= {imported.login, imported.address, *imported.addresses}
    return sorted(names)


def flush_everywhere(
    cfg: Config,
    store: Store,
    address: str,
    names: list[str],
    *,
    wait: float = 0.0,
    poke: Callable[[], None] | None = None,
) -> tuple[str, dict[str, str], list[str]]:
    """Forget these login names (an account's, or many accounts' at once under one `address`) in Dovecot's
    auth cache: at once on this node, and on every node through a flush request their NodeAgent carries out
    (this node's too: a second flush, after any login that raced the first). Waits up to `wait` seconds for
    the live nodes' confirmations; never raises for a node or a doveadm that does not answer.

    Returns (what this node did, node -> detail of every confirmation, live nodes that did not confirm).
    """
    if not names:  # flush_auth_cache would forget every entry
        return "nothing to flush", {}, []
    try:
        local = flush_auth_cache(cfg, names)
    except OSError as e:
        local = f"not flushed here: {e}"
        log.warning("%s: %s", address, local)
    kick = store.request_kick(address, names, kind="flush")
    if poke is not None:
        poke()
    deadline = time.monotonic() + wait
    while True:
        acks = store.kick_acks(kick.id)
        missing = sorted(set(store.live_nodes(cfg.limits.node_timeout)) - set(acks))
        if not missing or time.monotonic() >= deadline:
            return local, acks, missing
        time.sleep(POLL)


def quiesce(
    cfg: Config,
    store: Store,
    address: str,
    logins: list[str],
    *,
    stopping: threading.Event | None = None,
    poke: Callable[[], None] | None = None,
) -> None:
    """The account is in cutover: two kick rounds on every node, `limits.cutover_grace` apart (module docstring)."""
    limits = cfg.limits
    started = time.monotonic()
    first = kick_everywhere(store, address, logins, timeout=limits.kick_timeout, node_timeout=limits.node_timeout,
                            stopping=stopping, poke=poke)  # fmt: skip
    grace = max(0.0, limits.cutover_grace - (time.monotonic() - started))
    if stopping is not None and stopping.wait(grace):
        raise InterruptedError("sidecar stopping")
    if stopping is None:
        time.sleep(grace)
    second = kick_everywhere(store, address, logins, timeout=limits.kick_timeout, node_timeout=limits.node_timeout,
                             stopping=stopping, poke=poke)  # fmt: skip
    log.info("%s: sessions closed and route caches cleared on %d node(s) in %.1f s (%s)", address,
             len(set(first) | set(second)), time.monotonic() - started, "; ".join(f"{n}: {d}" for n, d in
             sorted(second.items())))  # fmt: skip
