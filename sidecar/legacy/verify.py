"""Does the legacy server accept this login and password? IMAP, POP3 or SMTP AUTH, one short session each.

    LegacyVerifier(cfg.legacy).verify(login, password, client_ip="198.51.100.7") -> "imap" | "pop3" | "smtp"

Outcomes (typed: legacy/errors.py):
  return              the legacy server accepted the credentials (the protocol that did is returned)
  LegacyAuthError     a definite "no": wrong password, unknown user, or a login that cannot be valid
                      (empty, control characters: refused before any byte is sent)
  LegacyUnavailable   we could not get an answer: connection refused, timeout, TLS or certificate failure,
                      BYE, [UNAVAILABLE]/[SYS/TEMP]/[IN-USE], 4xx, no usable mechanism, protocol error

More (the reasons and limits behind this module): docs/modules.md, sidecar/legacy/verify.py.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import dataclasses
import functools
import imaplib
import ipaddress
import logging
import math
import poplib
import re
import select
import smtplib
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sidecar.config import LegacyConfig
from sidecar.legacy.errors import LegacyAuthFailed
from sidecar.legacy.errors import LegacyUnavailable as LegacyUnavailable  # its home is legacy/errors.py
from sidecar.legacy.limit import LegacyBusy, LegacyLimiter, Permit
from sidecar.legacy.tls import tls_context as tls_context  # re-exported: others import it from here

log = logging.getLogger("sidecar.legacy.verify")

PROTOCOLS = ("imap", "pop3", "smtp")
_CODE = re.compile(r"\[([A-Za-z/-]+)")
# IMAP response codes (RFC 5530) that say "could not check now", not "wrong password"
_IMAP_TEMPORARY = {"UNAVAILABLE", "SERVERBUG", "LIMIT", "INUSE", "PRIVACYREQUIRED", "OVERQUOTA"}
# POP3 response codes (RFC 2449, 3206) likewise
_POP3_TEMPORARY = {"SYS/TEMP", "SYS/PERM", "IN-USE", "LOGIN-DELAY"}
_IMAP_ATOM_SPECIALS = frozenset('(){ %*"\\]')
# An expired ready connection is replaced only when a check came within this many seconds: logins arriving
# at least every two minutes find ready connections; after that the pool drains (at most ready_max_age later)
# and nothing is held or opened until the next check.
READY_WARM_SECONDS = 120.0


class LegacyAuthError(LegacyAuthFailed):
    """The legacy server (or our own pre-check) definitely refused the credentials."""

    def __init__(self, protocol: str, reason: str) -> None:
        super().__init__(f"{protocol}: {reason}")
        self.protocol = protocol
        self.reason = reason


def check_login(login: str) -> None:
    """Refuse login names that could inject protocol commands (CR, LF, NUL, any control character)."""
    if not login:
        raise LegacyAuthError("precheck", "empty login")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in login):
        raise LegacyAuthError("precheck", "login contains control characters")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _clean(text: object, password: str) -> str:
    """A server reply fit for an exception message: printable, short, never the password."""
    s = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    if s.startswith(("b'", 'b"')) and s.endswith(("'", '"')):
        s = s[2:-1]
    if len(password) >= 3:
        s = s.replace(password, "<redacted>")
    s = "".join(c if c.isprintable() else " " for c in s)
    return s[:200]


def _imap_quote(raw: bytes) -> bytes | None:
    """An IMAP quoted string for raw, or None when it needs a literal (8-bit, CR, LF, NUL)."""
    if any(b > 0x7E or b < 0x20 for b in raw):
        return None
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def imap_login(imap: imaplib.IMAP4, login: str, password: str, caps: set[str]) -> None:
    """Log in on an imaplib connection, the one way the check and the copier both use (issue 14).

    LOGIN with quoted strings; the password as a literal ({N}, sent after the server's continuation) when it is
    not plain printable ASCII (8-bit, CR, LF), so it never becomes part of a command line; AUTHENTICATE PLAIN
    (UTF-8, base64) when the server says LOGINDISABLED or the login itself needs a literal. A refusal raises
    imaplib.IMAP4.error with the server's text; the password is in no message.
    """
    user, pw = _raw(login), _raw(password)
    if b"\0" in user or b"\0" in pw:
        raise imaplib.IMAP4.error("NUL in a login or password")
    quoted_user = _imap_quote(user)
    if "LOGINDISABLED" in caps or quoted_user is None:
        if "AUTH=PLAIN" not in caps:
            raise LegacyUnavailable("IMAP: LOGIN not usable and no AUTH=PLAIN")
        imap.authenticate("PLAIN", lambda _challenge: b"\0" + user + b"\0" + pw)
        return
    quoted_pw = _imap_quote(pw)
    if quoted_pw is None:
        imap.literal = pw  # type: ignore[assignment]  # imaplib sends it as {N} after the arguments
        typ, data = imap._simple_command("LOGIN", quoted_user.decode("ascii"))
    else:
        typ, data = imap._simple_command("LOGIN", quoted_user.decode("ascii"), quoted_pw.decode("ascii"))
    if typ != "OK":
        raise imaplib.IMAP4.error(data[-1] if data else b"LOGIN refused")


def _is_ip(text: str) -> bool:
    """A literal IPv4/IPv6 address (what may be passed on in XCLIENT); never anything a peer could inject."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _pop3_command(pop: poplib.POP3, line: bytes) -> bytes:
    """Send one raw command line (poplib's public methods encode str as strict UTF-8); error_proto on -ERR."""
    client: Any = pop  # poplib's _putline/_getresp: stable since Python 2, absent from typeshed
    client._putline(line)
    return bytes(client._getresp())


def _pop3_lost(e: Exception) -> bool:
    """The POP3 connection failed (socket error, EOF, garbage): no answer from the server, unlike a -ERR reply.

    poplib raises error_proto with the server's reply as bytes, and with a str of its own for EOF ("-ERR EOF")
    and over-long lines.
    """
    return isinstance(e, OSError) or (isinstance(e, poplib.error_proto) and bool(e.args) and isinstance(e.args[0], str))


class _TlsSource:
    """The TLS context for legacy connections, built once on first use (from any thread)."""

    def __init__(self, cfg: LegacyConfig) -> None:
        self.cfg = cfg
        self._context: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    def get(self) -> ssl.SSLContext:
        with self._lock:
            if self._context is None:
                try:
                    self._context = tls_context(self.cfg)
                except (OSError, ssl.SSLError) as e:
                    raise LegacyUnavailable(f"cannot load legacy.ca_file: {e}") from None
            return self._context


# --- ready connections: connected, TLS done, not logged in ---------------------------------------------------


def _unusable(sock: socket.socket) -> bool:
    """True when an idle connection has something to read: the server closed it (EOF, reset) or spoke (BYE).

    Until we send a command, a healthy IMAP or POP3 server is silent. Over TLS, a readable socket may carry
    only a post-handshake message (a TLS 1.3 session ticket): a non-blocking read tells that apart.
    """
    if sock.fileno() < 0:
        return True
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI)
    if not poller.poll(0):
        return False
    if not isinstance(sock, ssl.SSLSocket):
        return True
    timeout = sock.gettimeout()
    try:
        sock.setblocking(False)
        sock.recv(1)  # data: the server spoke; b"": it closed
        return True
    except ssl.SSLWantReadError:  # only TLS records without application data
        return False
    except OSError:
        return True
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(timeout)


_C = TypeVar("_C")


class _ReadyPool(Generic[_C]):
    """Up to `size` connections of one protocol, opened ahead of checks, each handed out once.

    take() gives the oldest usable one (or None); refill(), once a check got a connection, wakes a manager
    thread (at most one per pool, started on demand, gone when nothing is held) that opens the missing ones,
    in parallel, so that `size` are ready or being opened, never more. It also closes connections older than
    `max_age` and replaces them only while checks keep coming (within `warm` seconds). The pool refers to no
    verifier: an abandoned LegacyVerifier is collected and its finalizer closes the pool.
    """

    def __init__(
        self,
        proto: str,
        size: int,
        max_age: float,
        warm: float,
        open_: Callable[[], _C],
        close: Callable[[_C], None],
        sock_of: Callable[[_C], socket.socket],
    ) -> None:
        self.proto = proto
        self.size = size
        self.max_age = max_age
        self.warm = warm
        self._open = open_
        self._close = close
        self._sock_of = sock_of
        self._cond = threading.Condition()
        self._ready: collections.deque[tuple[float, _C]] = collections.deque()  # (ready since, connection)
        self._opening = 0
        self._fill = False  # cleared when an open fails: no retries until the next check
        self._last_check = -math.inf
        self._closed = False
        self._thread: threading.Thread | None = None

    def count(self) -> int:
        """Connections ready now (not counting one being opened)."""
        with self._cond:
            return len(self._ready)

    def take(self) -> _C | None:
        while True:
            with self._cond:
                self._last_check = time.monotonic()
                if not self._ready:
                    return None
                born, conn = self._ready.popleft()
            if time.monotonic() - born < self.max_age and not _unusable(self._sock_of(conn)):
                return conn
            log.debug("legacy %s: ready connection closed by the server or expired; discarded", self.proto)
            self._close(conn)

    def refill(self) -> None:
        """A check got a connection: make sure `size` are ready again, in the background."""
        with self._cond:
            if self._closed:
                return
            self._fill = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"legacy-{self.proto}-ready", daemon=True)
                self._thread.start()
            else:
                self._cond.notify_all()

    def close(self, wait: float = 0.0) -> None:
        """Close every ready connection; one being opened is closed by the thread when its open returns."""
        with self._cond:
            self._closed = True
            conns = [conn for _, conn in self._ready]
            self._ready.clear()
            thread = self._thread
            self._cond.notify_all()
        for conn in conns:
            self._close(conn)
        if wait > 0 and thread is not None and thread is not threading.current_thread():
            thread.join(wait)

    def _run(self) -> None:
        """The pool's manager: starts openers (as many as are missing, at once), closes expired connections,
        and leaves when nothing is held or being opened."""
        while True:
            with self._cond:
                now = time.monotonic()
                expired: list[_C] = []
                while self._ready and now - self._ready[0][0] >= self.max_age:
                    expired.append(self._ready.popleft()[1])
                start = 0
                if not self._closed and self._fill and now - self._last_check < self.warm:
                    start = max(0, self.size - len(self._ready) - self._opening)
                    self._opening += start
                done = not start and not self._opening and (self._closed or not self._ready)
                if done:
                    self._thread = None  # nothing held: the next refill() starts a new manager
                elif not start and not expired:  # wait for an opener, a check, close() or the oldest's expiry
                    self._cond.wait(self._ready[0][0] + self.max_age - now if self._ready else None)
                    continue
            for conn in expired:
                self._close(conn)
            for _ in range(start):
                threading.Thread(target=self._open_one, name=f"legacy-{self.proto}-open", daemon=True).start()
            if done:
                return

    def _open_one(self) -> None:
        conn: _C | None = None
        try:
            conn = self._open()
        except Exception as e:  # the checks themselves connect and report the trouble
            log.debug("legacy %s: no ready connection: %s", self.proto, e)
        with self._cond:
            self._opening -= 1
            if conn is None:
                self._fill = False  # no retries until the next check
            elif not self._closed and len(self._ready) < self.size:
                self._ready.append((time.monotonic(), conn))
                conn = None
            self._cond.notify_all()
        if conn is not None:
            self._close(conn)


def _close_pools(pools: tuple[_ReadyPool[Any], ...], wait: float = 0.0) -> None:
    for pool in pools:
        pool.close(wait)


# --- opening connections (up to, never including, the credentials) ------------------------------------------


def _open_imap(cfg: LegacyConfig, tls: Callable[[], ssl.SSLContext]) -> imaplib.IMAP4:
    """An IMAP connection ready for LOGIN: greeting read, STARTTLS done when configured, capabilities known."""
    try:
        if cfg.imap_tls == "implicit":
            imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(cfg.host, cfg.imap_port, ssl_context=tls(), timeout=cfg.timeout)
        else:
            imap = imaplib.IMAP4(cfg.host, cfg.imap_port, timeout=cfg.timeout)
    except (OSError, imaplib.IMAP4.error) as e:
        raise LegacyUnavailable(f"IMAP connect to {cfg.host}:{cfg.imap_port}: {_clean(e, '')}") from None
    try:
        if cfg.imap_tls == "starttls":
            if "STARTTLS" not in imap.capabilities:
                raise LegacyUnavailable("IMAP server does not offer STARTTLS")
            try:
                imap.starttls(ssl_context=tls())
            except imaplib.IMAP4.error as e:  # refused STARTTLS: "cannot check", never a wrong password
                raise LegacyUnavailable(f"IMAP STARTTLS failed: {_clean(e, '')}") from None
        if imap.state != "NONAUTH":
            raise LegacyUnavailable("IMAP server pre-authenticated the connection")
    except OSError as e:  # TLS handshake, certificate, timeout
        _close_imap(imap)
        raise LegacyUnavailable(f"IMAP: {_clean(e, '')}") from None
    except BaseException:
        _close_imap(imap)
        raise
    return imap


def _close_imap(imap: imaplib.IMAP4) -> None:
    """Drop an IMAP connection without a word (a ready one never logged in; LOGOUT is for sessions)."""
    with contextlib.suppress(OSError):
        imap.shutdown()
    _release(imap)


@dataclasses.dataclass
class _Pop3:
    """A POP3 connection with what CAPA said (after STLS when that was done)."""

    pop: poplib.POP3
    caps: dict[str, list[str]]


def _open_pop3(cfg: LegacyConfig, tls: Callable[[], ssl.SSLContext]) -> _Pop3:
    """A POP3 connection ready for the credentials: greeting read, STLS done when configured, CAPA known."""
    try:
        if cfg.pop3_tls == "implicit":
            pop: poplib.POP3 = poplib.POP3_SSL(cfg.host, cfg.pop3_port, context=tls(), timeout=cfg.timeout)
        else:
            pop = poplib.POP3(cfg.host, cfg.pop3_port, timeout=cfg.timeout)
    except (OSError, poplib.error_proto) as e:
        raise LegacyUnavailable(f"POP3 connect to {cfg.host}:{cfg.pop3_port}: {_clean(e, '')}") from None
    try:
        try:
            caps = pop.capa()
        except poplib.error_proto as e:
            if _pop3_lost(e):
                raise
            caps = {}  # pre-RFC 2449 server: USER/PASS it is
        if cfg.pop3_tls == "starttls":
            if "STLS" not in caps:
                raise LegacyUnavailable("POP3 server does not offer STLS")
            try:
                pop.stls(context=tls())
            except poplib.error_proto as e:  # refused STLS: "cannot check", never a wrong password
                raise LegacyUnavailable(f"POP3 STLS failed: {_clean(e, '')}") from None
            caps = pop.capa()
    except (OSError, poplib.error_proto) as e:  # TLS handshake, certificate, timeout, connection lost
        _close_pop3(_Pop3(pop, {}))
        raise LegacyUnavailable(f"POP3: {_clean(e, '')}") from None
    except BaseException:
        _close_pop3(_Pop3(pop, {}))
        raise
    return _Pop3(pop, caps)


def _close_pop3(conn: _Pop3) -> None:
    with contextlib.suppress(OSError):
        conn.pop.close()
    _release(conn)


# --- the node's cap on legacy connections (sidecar/legacy/limit.py): a connection carries its permit ----------
_PERMIT = "_autoport_permit"


def _limited(limiter: LegacyLimiter | None, open_: Callable[[], _C], *, ready: bool = False) -> Callable[[], _C]:
    """open_ under the limiter: a check waits briefly for a place (LegacyBusy after limit.LOGIN_WAIT); a ready
    connection is opened only when the share kept for logins has room now."""
    if limiter is None:
        return open_

    def opener() -> _C:
        permit = limiter.acquire("login", 0.0 if ready else None, ready=ready)
        try:
            conn = open_()
        except BaseException:
            permit.release()
            raise
        setattr(conn, _PERMIT, permit)
        return conn

    return opener


def _release(conn: object) -> None:
    permit: Permit | None = getattr(conn, _PERMIT, None)
    if permit is not None:
        permit.release()


def _imap_socket(imap: imaplib.IMAP4) -> socket.socket:
    sock: socket.socket = imap.sock
    return sock


def _pop3_socket(conn: _Pop3) -> socket.socket:
    sock: socket.socket = conn.pop.sock
    return sock


class LegacyVerifier:
    """Checks credentials against the legacy server per the [legacy] config section. Thread-safe.

    With legacy.ready_connections > 0 it keeps connections ready for IMAP and POP3 checks (module docstring);
    close() drops them (the daemon calls it on stop; an abandoned verifier's are dropped when it is collected).
    warm_seconds: how recent a check must be for an expired ready connection to be replaced.
    """

    def __init__(
        self, cfg: LegacyConfig, *, warm_seconds: float = READY_WARM_SECONDS, limiter: LegacyLimiter | None = None
    ) -> None:
        self.cfg = cfg
        self.limiter = limiter  # this node's cap on legacy connections (limits.legacy_connections); None: none
        self._tls_source = _TlsSource(cfg)
        self._pools: dict[str, _ReadyPool[Any]] = {}
        if cfg.ready_connections > 0 and cfg.ready_max_age > 0:
            size, age = cfg.ready_connections, cfg.ready_max_age
            tls = self._tls_source.get  # the pools refer to the TLS source, never to self (see _ReadyPool)
            open_imap = _limited(limiter, functools.partial(_open_imap, cfg, tls), ready=True)
            open_pop3 = _limited(limiter, functools.partial(_open_pop3, cfg, tls), ready=True)
            imap_pool: _ReadyPool[imaplib.IMAP4] = _ReadyPool(
                "imap", size, age, warm_seconds, open_imap, _close_imap, _imap_socket
            )
            pop3_pool: _ReadyPool[_Pop3] = _ReadyPool(
                "pop3", size, age, warm_seconds, open_pop3, _close_pop3, _pop3_socket
            )
            self._pools = {"imap": imap_pool, "pop3": pop3_pool}
        self._finalizer = weakref.finalize(self, _close_pools, tuple(self._pools.values()))

    def _tls(self) -> ssl.SSLContext:
        return self._tls_source.get()

    def ready_counts(self) -> dict[str, int]:
        """Connections ready now, per protocol; empty when ready connections are off."""
        return {proto: pool.count() for proto, pool in self._pools.items()}

    def close(self, wait: float = 2.0) -> None:
        """Close the ready connections and stop refilling; later checks connect per check. Idempotent."""
        _close_pools(tuple(self._pools.values()), wait)
        self._finalizer()

    def _connection(self, proto: str, open_: Callable[[], _C]) -> tuple[_C, bool]:
        """A ready connection (True) or a new one (False); LegacyUnavailable when none can be opened.

        Once a check holds a working connection, the pool refills behind it.
        """
        pool: _ReadyPool[_C] | None = self._pools.get(proto)
        conn = pool.take() if pool is not None else None
        pooled = conn is not None
        if conn is None:
            conn = open_()
        if pool is not None:
            pool.refill()
        return conn, pooled

    # --- the entry point ---------------------------------------------------------------------------------
    def verify(self, login: str, password: str, *, client_ip: str = "") -> str:
        """The protocol that accepted the credentials; LegacyAuthError or LegacyUnavailable otherwise."""
        check_login(login)
        if not password:
            raise LegacyAuthError("precheck", "empty password")
        methods: dict[str, Callable[[str, str, str], None]] = {
            "imap": self.verify_imap,
            "pop3": self.verify_pop3,
            "smtp": self.verify_smtp,
        }
        problems: list[str] = []
        for proto in self.cfg.verify_with:
            try:
                methods[proto](login, password, client_ip)
            except LegacyBusy as e:  # every other protocol would wait for the same connections
                log.info("legacy %s could not check %r: %s", proto, login, e)
                raise LegacyUnavailable("; ".join([*problems, f"{proto}: {e}"])) from None
            except LegacyUnavailable as e:
                problems.append(f"{proto}: {e}")
                log.info("legacy %s could not check %r: %s", proto, login, e)
                if e.spent:  # the server may have counted an attempt already: no second protocol
                    raise LegacyUnavailable("; ".join(problems), spent=True) from None
                continue
            return proto
        raise LegacyUnavailable("; ".join(problems) or "no protocol in legacy.verify_with")

    # --- IMAP --------------------------------------------------------------------------------------------
    def _open_imap(self) -> imaplib.IMAP4:
        return _limited(self.limiter, functools.partial(_open_imap, self.cfg, self._tls_source.get))()

    def verify_imap(self, login: str, password: str, client_ip: str = "") -> None:
        cfg = self.cfg
        check_login(login)
        if not cfg.imap_port:
            raise LegacyUnavailable("no legacy IMAP port configured")
        imap, pooled = self._connection("imap", self._open_imap)
        authenticated = False
        try:
            try:
                self._imap_id(imap, client_ip)
            except (imaplib.IMAP4.abort, OSError) as e:
                if not pooled:
                    raise
                # the ready connection died before the credentials were sent: a fresh one costs no login
                log.info("legacy IMAP: ready connection failed before LOGIN (%s); using a new one", _clean(e, password))
                _close_imap(imap)
                imap = self._open_imap()
                self._imap_id(imap, client_ip)
            self._imap_login(imap, login, password)
            authenticated = True
        except imaplib.IMAP4.abort as e:  # BYE, connection lost, protocol garbage
            raise LegacyUnavailable(f"IMAP: {_clean(e, password)}") from None
        except imaplib.IMAP4.error as e:
            text = _clean(e, password)
            m = _CODE.search(text)
            if "command error: BAD" in text or (m and m.group(1).upper() in _IMAP_TEMPORARY):
                raise LegacyUnavailable(f"IMAP: {text}") from None
            raise LegacyAuthError("imap", text) from None
        except OSError as e:
            raise LegacyUnavailable(f"IMAP: {_clean(e, password)}", spent=isinstance(e, TimeoutError)) from None
        finally:
            try:
                if authenticated:
                    imap.logout()
                else:
                    imap.shutdown()
            except (OSError, imaplib.IMAP4.error):
                with contextlib.suppress(OSError):
                    imap.shutdown()
            _release(imap)

    def _imap_login(self, imap: imaplib.IMAP4, login: str, password: str) -> None:
        imap_login(imap, login, password, set(imap.capabilities))

    def _imap_id(self, imap: imaplib.IMAP4, client_ip: str) -> None:
        """`ID ("x-originating-ip" IP)` when offered and configured (before the credentials)."""
        if not (self.cfg.send_client_ip and client_ip and "ID" in imap.capabilities):
            return
        try:
            ip = str(ipaddress.ip_address(client_ip))
        except ValueError:
            return
        imaplib.Commands.setdefault("ID", ("NONAUTH", "AUTH", "SELECTED"))  # imaplib lacks RFC 2971
        typ, _ = imap._simple_command("ID", f'("x-originating-ip" "{ip}")')
        if typ != "OK":
            log.info("legacy IMAP refused ID; continuing without x-originating-ip")

    # --- POP3 --------------------------------------------------------------------------------------------
    def _open_pop3(self) -> _Pop3:
        return _limited(self.limiter, functools.partial(_open_pop3, self.cfg, self._tls_source.get))()

    def verify_pop3(self, login: str, password: str, client_ip: str = "") -> None:
        cfg = self.cfg
        check_login(login)
        if not cfg.pop3_port:
            raise LegacyUnavailable("no legacy POP3 port configured")
        conn, pooled = self._connection("pop3", self._open_pop3)
        authenticated = False
        try:
            try:
                self._pop3_prelude(conn, login, password, client_ip)
            except (OSError, poplib.error_proto) as e:
                if not (pooled and _pop3_lost(e)):
                    raise
                # the ready connection died before the credentials were sent: a fresh one costs no login
                log.info("legacy POP3: ready connection failed before PASS (%s); using a new one", _clean(e, password))
                _close_pop3(conn)
                conn = self._open_pop3()
                self._pop3_prelude(conn, login, password, client_ip)
            self._pop3_credentials(conn, login, password)
            authenticated = True
        except poplib.error_proto as e:
            text = _clean(e, password)
            m = _CODE.search(text)
            if _pop3_lost(e) or not text.startswith("-ERR") or (m and m.group(1).upper() in _POP3_TEMPORARY):
                raise LegacyUnavailable(f"POP3: {text}") from None
            raise LegacyAuthError("pop3", text) from None
        except OSError as e:
            raise LegacyUnavailable(f"POP3: {_clean(e, password)}", spent=isinstance(e, TimeoutError)) from None
        finally:
            try:
                if authenticated:
                    conn.pop.quit()  # nothing was marked deleted: UPDATE state changes nothing
                else:
                    conn.pop.close()
            except (OSError, poplib.error_proto):
                _close_pop3(conn)
            _release(conn)

    def _pop3_prelude(self, conn: _Pop3, login: str, password: str, client_ip: str) -> None:
        """What precedes the password: XCLIENT when offered, and USER when AUTH PLAIN is not."""
        pop, caps = conn.pop, conn.caps
        if "XCLIENT" in caps and self.cfg.send_client_ip and _is_ip(client_ip):
            # Dovecot's pop3-login offers XCLIENT to login_trusted_networks: its auth penalty and logs then
            # apply to the user's own address instead of ours (every check comes from this one host)
            try:
                _pop3_command(pop, b"XCLIENT ADDR=" + client_ip.encode("ascii"))
            except poplib.error_proto as e:
                if _pop3_lost(e):
                    raise
                log.info("legacy POP3 refused XCLIENT; continuing without the client address")
        if self._pop3_sasl_plain(conn):
            return
        if caps and "USER" not in caps:
            raise LegacyUnavailable("POP3: neither USER nor SASL PLAIN offered")
        pw = _raw(password)
        if b"\r" in pw or b"\n" in pw:
            raise LegacyUnavailable("POP3: password cannot be sent with PASS and no SASL PLAIN")
        _pop3_command(pop, b"USER " + _raw(login))

    def _pop3_credentials(self, conn: _Pop3, login: str, password: str) -> None:
        user, pw = _raw(login), _raw(password)
        if self._pop3_sasl_plain(conn):
            token = base64.b64encode(b"\0" + user + b"\0" + pw)
            _pop3_command(conn.pop, b"AUTH PLAIN " + token)
        else:
            _pop3_command(conn.pop, b"PASS " + pw)

    @staticmethod
    def _pop3_sasl_plain(conn: _Pop3) -> bool:
        return "PLAIN" in (m.upper() for m in conn.caps.get("SASL", []))

    # --- SMTP AUTH ---------------------------------------------------------------------------------------
    def verify_smtp(self, login: str, password: str, client_ip: str = "") -> None:
        check_login(login)
        if not self.cfg.submission_port:
            raise LegacyUnavailable("no legacy submission port configured")
        permit = self.limiter.acquire("login") if self.limiter is not None else None
        try:
            self._verify_smtp(login, password, client_ip)
        finally:
            if permit is not None:
                permit.release()

    def _verify_smtp(self, login: str, password: str, client_ip: str) -> None:
        cfg = self.cfg
        helo = socket.gethostname() or "localhost"
        try:
            if cfg.submission_tls == "implicit":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    cfg.host,
                    cfg.submission_port,
                    local_hostname=helo,
                    timeout=cfg.timeout,
                    context=self._tls(),
                )
            else:
                smtp = smtplib.SMTP(cfg.host, cfg.submission_port, local_hostname=helo, timeout=cfg.timeout)
        except OSError as e:  # smtplib.SMTPException is an OSError
            raise LegacyUnavailable(
                f"SMTP connect to {cfg.host}:{cfg.submission_port}: {_clean(e, password)}"
            ) from None
        try:
            code, text = self._smtp_session(smtp, login, password, client_ip)
        except OSError as e:
            raise LegacyUnavailable(f"SMTP: {_clean(e, password)}", spent=isinstance(e, TimeoutError)) from None
        finally:
            try:
                smtp.quit()
            except OSError:
                smtp.close()
        if code == 235:
            return
        reply = f"{code} {_clean(text, password)}"
        if code == 535:
            raise LegacyAuthError("smtp", reply)
        raise LegacyUnavailable(f"SMTP AUTH: {reply}")

    def _smtp_session(self, smtp: smtplib.SMTP, login: str, password: str, client_ip: str) -> tuple[int, Any]:
        code, _ = smtp.ehlo()
        if code != 250:
            raise LegacyUnavailable(f"SMTP EHLO refused ({code})")
        if self.cfg.submission_tls == "starttls":
            if not smtp.has_extn("starttls"):
                raise LegacyUnavailable("SMTP server does not offer STARTTLS")
            smtp.starttls(context=self._tls())
            smtp.ehlo()
        if self.cfg.send_client_ip and client_ip and smtp.has_extn("xclient"):
            self._xclient(smtp, client_ip)
        mechanisms = smtp.esmtp_features.get("auth", "").upper().split()
        user, pw = _raw(login), _raw(password)

        def b64(data: bytes) -> str:
            return binascii.b2a_base64(data, newline=False).decode("ascii")

        if "PLAIN" in mechanisms:
            code, text = smtp.docmd("AUTH", "PLAIN " + b64(b"\0" + user + b"\0" + pw))
            if code == 334:  # a server that ignores the initial response
                code, text = smtp.docmd(b64(b"\0" + user + b"\0" + pw))
            return code, text
        if "LOGIN" in mechanisms:
            code, text = smtp.docmd("AUTH", "LOGIN")
            if code == 334:
                code, text = smtp.docmd(b64(user))
            if code == 334:
                code, text = smtp.docmd(b64(pw))
            return code, text
        raise LegacyUnavailable("SMTP: no AUTH PLAIN or LOGIN offered")

    def _xclient(self, smtp: smtplib.SMTP, client_ip: str) -> None:
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            return
        addr = f"IPV6:{ip}" if ip.version == 6 else str(ip)
        code, _ = smtp.docmd("XCLIENT", f"ADDR={addr}")
        if code != 220:
            log.info("legacy SMTP refused XCLIENT (%s); continuing without the client address", code)
            return
        smtp.ehlo_resp = None
        smtp.esmtp_features = {}
        smtp.does_esmtp = False
        code, _ = smtp.ehlo()
        if code != 250:
            raise LegacyUnavailable(f"SMTP EHLO after XCLIENT refused ({code})")
