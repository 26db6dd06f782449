"""The pass-through authentication decision: one login attempt in, OK (with Dovecot fields) / FAIL / TEMP out.

AuthPolicy.decide() never touches a socket (edge/auth_server does). The typed login is mapped once to (account,
legacy login) by auth/logins.resolve(); the legacy check, proxy fields, hash, credentials and budgets use that
pair. Store or legacy trouble is TEMP; only a definite "no" is FAIL; an account in cutover gets TEMP for proxied
services, so no proxied session starts while the final delta runs.

More (the reasons and limits behind this module): docs/modules.md, sidecar/auth/policy.py.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import math
import pwd
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from sidecar.auth import passwords
from sidecar.auth.logins import Identity, InvalidLogin, resolve
from sidecar.config import Config
from sidecar.legacy.verify import LegacyAuthError, LegacyUnavailable
from sidecar.logsetup import SECRETS
from sidecar.migration.cutover import account_names
from sidecar.states import IllegalTransition, State, in_flight, is_local
from sidecar.store.base import Store, StoreError, StoreUnavailable
from sidecar.wire.authproto import FAIL, OK, TEMP, Reply, Request

log = logging.getLogger("sidecar.auth")

PROXY_SERVICES = ("imap", "pop3", "sieve")  # Dovecot proxies these to the legacy server until migration
PLAIN_OK_SERVICES = ("smtp", "submission")  # authentication only; mail goes through Postfix routing
CREDENTIAL_TTL = 3600.0
POSITIVE_TTL = 300.0  # seconds a verified password is answered without asking the legacy server again


class Verifier(Protocol):
    def verify(self, login: str, password: str, *, client_ip: str = "") -> str: ...


# --- the plaintext for the copier ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Credential:
    login: str
    password: str = dataclasses.field(repr=False)
    stored_at: float


class CredentialCache:
    """Verified passwords for the copy job runner, in memory only, each for ttl seconds."""

    def __init__(self, ttl: float = CREDENTIAL_TTL, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._items: dict[str, Credential] = {}

    def put(self, address: str, login: str, password: str) -> None:
        with self._lock:
            self._purge()
            self._items[address] = Credential(login, password, self._clock())

    def get(self, address: str) -> Credential | None:
        with self._lock:
            self._purge()
            return self._items.get(address)

    def pop(self, address: str) -> Credential | None:
        with self._lock:
            self._purge()
            return self._items.pop(address, None)

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._items)

    def _purge(self) -> None:
        cutoff = self._clock() - self.ttl
        for address in [a for a, c in self._items.items() if c.stored_at <= cutoff]:
            del self._items[address]


# --- rate limiting --------------------------------------------------------------------------------------


def keyed_digest(key: bytes, login: str, password: str, *, person: bytes = b"") -> bytes:
    """A salted (per-process key), length-prefixed digest of (login, password): what the caches keep instead
    of the password."""
    h = hashlib.blake2b(key=key, digest_size=32, person=person)
    for part in (login, password):
        raw = part.encode("utf-8", "surrogateescape")
        h.update(len(raw).to_bytes(4, "big"))
        h.update(raw)
    return h.digest()


class FailureBudget:
    """Failures per key within a sliding window; over `limit`, the key is refused locally."""

    def __init__(self, limit: int, window: float, *, clock: Callable[[], float], max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._fails: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def _trim(self, key: str, now: float) -> collections.deque[float] | None:
        q = self._fails.get(key)
        if q is None:
            return None
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._fails[key]
            return None
        return q

    def exhausted(self, key: str) -> bool:
        if not key or self.limit <= 0:
            return False
        with self._lock:
            q = self._trim(key, self._clock())
            return q is not None and len(q) >= self.limit

    def add(self, key: str) -> None:
        if not key:
            return
        with self._lock:
            now = self._clock()
            q = self._trim(key, now)
            if q is None:
                q = self._fails[key] = collections.deque(maxlen=max(self.limit, 1))
            q.append(now)
            self._fails.move_to_end(key)
            while len(self._fails) > self.max_keys:  # bounded memory under a spray of keys
                self._fails.popitem(last=False)

    def clear(self, key: str) -> None:
        with self._lock:
            self._fails.pop(key, None)


class NegativeCache:
    """(login, password) pairs the legacy server refused, as BLAKE2b digests keyed per process."""

    def __init__(self, ttl: float, *, clock: Callable[[], float], max_items: int = 100_000) -> None:
        self.ttl = ttl
        self.max_items = max_items
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def _digest(self, login: str, password: str) -> bytes:
        return keyed_digest(self._key, login, password)

    def add(self, login: str, password: str) -> None:
        if self.ttl <= 0:
            return
        d = self._digest(login, password)
        with self._lock:
            self._items[d] = self._clock() + self.ttl
            self._items.move_to_end(d)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def __contains__(self, item: tuple[str, str]) -> bool:
        d = self._digest(*item)
        with self._lock:
            until = self._items.get(d)
            if until is None:
                return False
            if until <= self._clock():
                del self._items[d]
                return False
            return True

    def discard(self, login: str, password: str) -> None:
        with self._lock:
            self._items.pop(self._digest(login, password), None)


class PositiveCache:
    """The password the legacy server last accepted per login, as a keyed BLAKE2b digest, for ttl seconds.

    A client opens several connections at once (Thunderbird: five); each runs checkpassword. With this
    cache only the first is checked on the legacy server and hashed; the others are answered from here.
    It never masks a state change: the policy reads the account's state from the store before asking it,
    and only copying/cutover accounts are answered from it. One entry per login: a newly verified password
    replaces the old one. Proxied sessions are checked by the legacy server again anyway (Dovecot sends it
    the password); only SMTP AUTH relies on this alone, for at most ttl seconds.
    """

    def __init__(self, ttl: float, *, clock: Callable[[], float], max_items: int = 100_000) -> None:
        self.ttl = ttl
        self.max_items = max_items
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[str, tuple[bytes, float]] = collections.OrderedDict()

    def _digest(self, login: str, password: str) -> bytes:
        return keyed_digest(self._key, login, password, person=b"autoport-pos")

    def add(self, login: str, password: str) -> None:
        if self.ttl <= 0:
            return
        d = self._digest(login, password)
        with self._lock:
            self._items[login] = (d, self._clock() + self.ttl)
            self._items.move_to_end(login)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def __contains__(self, item: tuple[str, str]) -> bool:
        login, password = item
        with self._lock:
            entry = self._items.get(login)
        if entry is None:
            return False
        digest, until = entry
        if until <= self._clock():
            self.discard(login)
            return False
        return hmac.compare_digest(digest, self._digest(login, password))

    def discard(self, login: str) -> None:
        with self._lock:
            self._items.pop(login, None)


class _SingleFlight:
    """One lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._locks[key]
                if users <= 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


# --- the policy -----------------------------------------------------------------------------------------


class _Decision(Exception):
    """Internal: stop and answer this (outcome is the log word)."""

    def __init__(self, status: str, outcome: str, *, address: str = "") -> None:
        super().__init__(outcome)
        self.status = status
        self.outcome = outcome
        self.address = address


def _mail_ids(cfg: Config) -> tuple[int | None, int | None]:
    uid, gid = cfg.target.mail_uid or None, cfg.target.mail_gid or None
    if uid is None or gid is None:
        try:
            pw = pwd.getpwnam(cfg.target.mail_user)
        except KeyError:
            log.warning("mail user %r does not exist: replies carry no userdb_uid/userdb_gid", cfg.target.mail_user)
            return uid, gid
        uid = uid if uid is not None else pw.pw_uid
        gid = gid if gid is not None else pw.pw_gid
    return uid, gid


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class AuthPolicy:
    """decide(request) -> Reply. See the module docstring for the rules."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        verifier: Verifier,
        *,
        credentials: CredentialCache | None = None,
        clock: Callable[[], float] = time.monotonic,
        busy_wait: float = 2.0,
        hasher: Callable[[str], str] | None = None,
        positive_ttl: float = POSITIVE_TTL,
        defer: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.verifier = verifier
        self.credentials = credentials if credentials is not None else CredentialCache()
        # called after a copy job was queued (or found queued) with fresh credentials: the job runner's wake-up
        self.on_queued: Callable[[str], None] | None = None
        self.busy_wait = busy_wait
        self._clock = clock
        limits = cfg.limits
        # per (account, client address): FAIL; per account over all clients: TEMP (module docstring)
        self.account_failures = FailureBudget(limits.auth_failures_per_account, limits.auth_failure_window, clock=clock)
        self.account_total_failures = FailureBudget(
            limits.auth_failures_per_account_total, limits.auth_failure_window, clock=clock
        )
        self.client_failures = FailureBudget(limits.auth_failures_per_client, limits.auth_failure_window, clock=clock)
        self.negative = NegativeCache(limits.negative_cache_ttl, clock=clock)
        self.positive = PositiveCache(positive_ttl, clock=clock)
        self._checks = threading.BoundedSemaphore(max(1, limits.auth_concurrency))
        self._flights = _SingleFlight()
        self._hash = hasher or (lambda password: passwords.hash_password(password, cfg.hash))
        self._defer = defer
        self._uid, self._gid = _mail_ids(cfg)

    # -- entry point --
    def decide(self, req: Request) -> Reply:
        started = time.monotonic()
        address = ""
        with SECRETS.registered(req.password):
            try:
                ident = resolve(req.user, self.cfg, self.store.find_imported)
                address = ident.address
                reply, outcome = self._decide(req, ident)
            except InvalidLogin as e:
                reply, outcome = Reply(FAIL), f"invalid-login ({e})"
            except _Decision as d:
                reply, outcome = Reply(d.status), d.outcome
            except StoreUnavailable as e:
                reply, outcome = Reply(TEMP), f"store-unavailable ({e})"
            except Exception:
                log.exception("auth: unexpected error for %r", req.user)
                reply, outcome = Reply(TEMP), "internal-error"
            log.info(
                "auth %s account=%s login=%r service=%s client=%s status=%s duration_ms=%d",
                outcome,
                address or "-",
                req.user,
                req.service or "-",
                req.remote_ip or "-",
                reply.status,
                (time.monotonic() - started) * 1000,
            )
        return reply

    def _decide(self, req: Request, ident: Identity) -> tuple[Reply, str]:
        address = ident.address
        service = req.service.lower()
        if service not in PROXY_SERVICES and service not in PLAIN_OK_SERVICES:
            raise _Decision(FAIL, f"service-not-allowed ({service or 'none'})")
        if service in PROXY_SERVICES and not self._legacy_port(service):
            raise _Decision(TEMP, f"no-legacy-port ({service})")
        self._check_budgets(req, ident)
        state = self._state(address)
        if is_local(state):
            return self._migrated_login(req, ident)
        self._not_in_cutover(service, state)
        if self._cached_yes(req, ident, state):
            return self._proxy_ok(req, ident, service, "ok-cached")

        with self._flights.hold(address):
            # concurrent attempts for this account queue here: look again at what the one before us learnt
            self._check_budgets(req, ident)
            if (address, req.password) in self.positive:
                # the attempt before us verified this password: read the state again (it may have moved)
                state = self._state(address)
                if is_local(state):
                    raise _Decision(FAIL, "migrated")
                self._not_in_cutover(service, state)
                if self._cached_yes(req, ident, state):
                    return self._proxy_ok(req, ident, service, "ok-cached")
            self._verify(req, ident)
            self._activate(ident, req.password)
            self.positive.add(address, req.password)
        self.account_failures.clear(self._pair(req, address))
        return self._proxy_ok(req, ident, service, "ok")

    @staticmethod
    def _not_in_cutover(service: str, state: State | None) -> None:
        """No proxied session may start once the account is in cutover: the final delta is about to read the
        legacy mailbox (sidecar.migration.cutover). The client retries and, once migrated, logs in locally."""
        if service in PROXY_SERVICES and state in (State.CUTOVER, State.MIGRATED):
            raise _Decision(TEMP, f"{state.value}-no-proxy")

    def _proxy_ok(self, req: Request, ident: Identity, service: str, outcome: str) -> tuple[Reply, str]:
        """The OK, after a last look at the state: the window between that read and the proxied session
        reaching the legacy server is what the cutover's second kick round covers."""
        if service in PROXY_SERVICES:
            self._not_in_cutover(service, self._state(ident.address))
        return Reply(OK, self._fields(service, req, ident)), outcome

    def _migrated_login(self, req: Request, ident: Identity) -> tuple[Reply, str]:
        """A migrated account reaches us in two cases. Without a hash (dovecot_deny lists those with one):
        migrated in bulk before its user ever logged in: verify once on the legacy server, store the hash,
        answer without proxy fields (the session is local); the next logins are native (sql passdb). With a
        hash: the login was typed in a spelling Dovecot's sql passdb does not list (a realm, non-ASCII upper
        case): checked against the stored hash here, never on the legacy server, and answered with `user` set to
        the account so Dovecot's userdb finds it."""
        address = ident.address
        with self._flights.hold(address):
            stored = self.store.password_hash(address)
            if stored:
                try:
                    matches = passwords.verify_password(req.password, stored)
                except passwords.HashError:
                    # a scheme we do not check (import-hashes): only Dovecot's spelling logs in, as before
                    raise _Decision(FAIL, "migrated") from None
                if not matches:
                    self._count_failure(req, address)
                    raise _Decision(FAIL, "migrated-wrong-password")
                self.account_failures.clear(self._pair(req, address))
                return Reply(OK, self._fields("", req, ident)), "ok-local-hash"
            self._verify(req, ident)
            self.store.record_login(address, ident.login, password_hash=self._hash(req.password), start_copy=False)
            self._flush_everywhere(address, ident.login)
        self.account_failures.clear(self._pair(req, address))
        return Reply(OK, self._fields("", req, ident)), "ok-first-local-login"

    def _flush_everywhere(self, address: str, login: str) -> None:
        """The account has a hash now: every node forgets the "unknown user" its Dovecot cached for the sql steps
        while this login was on its way here (those steps answer before step 3 asks us), so the next login is
        native. A request carried out by each node's NodeAgent within a heartbeat; a store error here is only
        logged: the cached answer merely sends logins here, checked against the hash, until
        auth_cache_negative_ttl."""
        try:
            self.store.request_kick(address, account_names(self.store, address, [login]), kind="flush")
        except StoreError as e:
            log.warning("%s: auth cache flush on every node not requested: %s", address, e)

    @staticmethod
    def _pair(req: Request, address: str) -> str:
        return f"{address}\0{req.remote_ip}"

    def _count_failure(self, req: Request, address: str) -> None:
        self.account_failures.add(self._pair(req, address))
        self.account_total_failures.add(address)
        self.client_failures.add(req.remote_ip)

    def _check_budgets(self, req: Request, ident: Identity) -> None:
        if self.client_failures.exhausted(req.remote_ip):
            raise _Decision(FAIL, "rate-limited-client")
        if self.account_failures.exhausted(self._pair(req, ident.address)):
            raise _Decision(FAIL, "rate-limited-account")
        if self.account_total_failures.exhausted(ident.address):
            raise _Decision(TEMP, "rate-limited-account-total")
        if (ident.legacy_login, req.password) in self.negative:
            raise _Decision(FAIL, "cached-no")

    def _cached_yes(self, req: Request, ident: Identity, state: State | None) -> bool:
        """A password verified moments ago for an account still on the legacy side: no new check, no rehash."""
        address = ident.address
        if not in_flight(state) or (address, req.password) not in self.positive:
            return False
        self.store.touch_login(address)
        self.credentials.put(address, ident.legacy_login, req.password)
        self._queued(address)
        log.debug("auth %r answered from the positive cache", req.user)
        return True

    def _state(self, address: str) -> State | None:
        return self.store.state_of(address)

    def _verify(self, req: Request, ident: Identity) -> None:
        address = ident.address
        if not self._checks.acquire(timeout=self.busy_wait):
            raise _Decision(TEMP, "busy")
        try:
            proto = self.verifier.verify(ident.legacy_login, req.password, client_ip=req.remote_ip)
        except LegacyAuthError as e:
            self.negative.add(ident.legacy_login, req.password)
            self._count_failure(req, address)
            raise _Decision(FAIL, f"legacy-no ({e.protocol})") from None
        except LegacyUnavailable as e:
            if e.spent:
                # the legacy server got the credentials but answered too late: it counted an attempt, so
                # this account's budget does too (else slow "no"s would let a brute force through unbounded)
                self.account_failures.add(self._pair(req, address))
                self.account_total_failures.add(address)
            raise _Decision(TEMP, f"legacy-unavailable ({e})") from None
        finally:
            self._checks.release()
        log.debug("legacy %s accepted %r", proto, req.user)

    def _activate(self, ident: Identity, password: str) -> State:
        """One store call: create or move the account to copying, record the login, queue the copy (and store
        the hash unless it is deferred)."""
        address = ident.address
        # credentials first: a runner that leases the job at once must find them
        self.credentials.put(address, ident.legacy_login, password)
        password_hash = self._hash(password) if self._defer is None else None
        try:
            state = self.store.record_login(address, ident.login, password_hash=password_hash)
        except IllegalTransition:
            self.credentials.pop(address)
            raise _Decision(FAIL, "migrated") from None
        self._queued(address)
        if self._defer is not None:
            self._defer(lambda: self._store_hash(address, password))
        return state

    def _store_hash(self, address: str, password: str) -> None:
        """Deferred: hash the verified password and store it. Trouble is logged; see the module docstring."""
        started = time.monotonic()
        with SECRETS.registered(password):
            try:
                self.store.set_password_hash(address, self._hash(password))
            except Exception as e:
                log.warning("auth: storing the hash of %s failed (%s); its next login stores it", address, e)
                return
        log.debug("auth: hash of %s stored in %d ms", address, (time.monotonic() - started) * 1000)

    def _queued(self, address: str) -> None:
        """Tell on_queued (the job runner's wake-up); its trouble is logged, never the login's answer."""
        if self.on_queued is None:
            return
        try:
            self.on_queued(address)
        except Exception:
            log.exception("auth: waking the job runner for %s failed", address)

    def _legacy_port(self, service: str) -> int:
        legacy = self.cfg.legacy
        return {"imap": legacy.imap_port, "pop3": legacy.pop3_port, "sieve": legacy.sieve_port}.get(service, 0)

    def _fields(self, service: str, req: Request, ident: Identity) -> dict[str, str]:
        # Dovecot goes on with the account's address as the user name (logs, userdb, Postfix's sasl_username)
        fields: dict[str, str] = {"user": ident.address}
        if service in PROXY_SERVICES:
            legacy = self.cfg.legacy
            tls = {"imap": legacy.imap_tls, "pop3": legacy.pop3_tls, "sieve": legacy.sieve_tls}[service]
            fields["proxy"] = "y"
            if legacy.tls_server_name and tls != "none" and _is_ip(legacy.host):
                # Dovecot checks the certificate against `host`; `hostip` is where it connects
                fields["host"] = legacy.tls_server_name
                fields["hostip"] = legacy.host
            else:
                fields["host"] = legacy.host
            fields["port"] = str(self._legacy_port(service))
            verify = "yes" if legacy.tls_verify else "any-cert"
            if tls == "implicit":
                fields["ssl"] = verify
            elif tls == "starttls":
                fields["starttls"] = verify
            fields["proxy_timeout"] = str(max(1, math.ceil(legacy.timeout)))
            fields["destuser"] = ident.legacy_login
            fields["pass"] = req.password
        if self._uid is not None:
            fields["userdb_uid"] = str(self._uid)
        if self._gid is not None:
            fields["userdb_gid"] = str(self._gid)
        return fields
