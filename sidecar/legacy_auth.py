"""Does the legacy server accept this login and password? IMAP, POP3 or SMTP AUTH, one short session each.

    LegacyVerifier(cfg.legacy).verify(login, password, client_ip="198.51.100.7") -> "imap" | "pop3" | "smtp"

Outcomes (typed, STYLE.md 4 and 6):
  return              the legacy server accepted the credentials (the protocol that did is returned)
  LegacyAuthError     a definite "no": wrong password, unknown user, or a login that cannot be valid
                      (empty, control characters: refused before any byte is sent)
  LegacyUnavailable   we could not get an answer: connection refused, timeout, TLS or certificate failure,
                      BYE, [UNAVAILABLE]/[SYS/TEMP]/[IN-USE], 4xx, no usable mechanism, protocol error

Protocols are tried in legacy.verify_with order; a "no" from the first protocol that answers is final,
"unavailable" moves to the next one. Per protocol:
  IMAP  CAPABILITY, STARTTLS when configured, `ID ("x-originating-ip" IP)` when offered and
        legacy.send_client_ip, LOGIN with quoted strings (the password as a literal when it is not plain
        ASCII), or AUTHENTICATE PLAIN when the server says LOGINDISABLED or the login needs a literal.
  POP3  CAPA, STLS when configured, AUTH PLAIN when offered, else USER/PASS.
  SMTP  EHLO, STARTTLS when configured, XCLIENT ADDR= when advertised and legacy.send_client_ip,
        AUTH PLAIN or LOGIN.
Certificates are checked against legacy.tls_server_name (or host) with legacy.ca_file (or the system store)
unless legacy.tls_verify is false. legacy.timeout bounds every single exchange.

stdlib clients (imaplib, poplib, smtplib) do the talking. Their gaps, filled here: imaplib sends LOGIN's user
unquoted and cannot encode non-ASCII; it has no ID command; smtplib's AUTH encodes credentials as ASCII only.
Nothing here logs the password; server replies put into exceptions are cut short and scrubbed of it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import imaplib
import ipaddress
import logging
import poplib
import re
import smtplib
import socket
import ssl
from collections.abc import Callable
from typing import Any

from sidecar.config import LegacyConfig

log = logging.getLogger("sidecar.legacy_auth")

PROTOCOLS = ("imap", "pop3", "smtp")
_CODE = re.compile(r"\[([A-Za-z/-]+)")
# IMAP response codes (RFC 5530) that say "could not check now", not "wrong password"
_IMAP_TEMPORARY = {"UNAVAILABLE", "SERVERBUG", "LIMIT", "INUSE", "PRIVACYREQUIRED", "OVERQUOTA"}
# POP3 response codes (RFC 2449, 3206) likewise
_POP3_TEMPORARY = {"SYS/TEMP", "SYS/PERM", "IN-USE", "LOGIN-DELAY"}
_IMAP_ATOM_SPECIALS = frozenset('(){ %*"\\]')


class LegacyAuthError(Exception):
    """The legacy server (or our own pre-check) definitely refused the credentials."""

    def __init__(self, protocol: str, reason: str) -> None:
        super().__init__(f"{protocol}: {reason}")
        self.protocol = protocol
        self.reason = reason


class LegacyUnavailable(Exception):
    """No answer could be had from the legacy server: a temporary failure.

    `spent` is true when the credentials may already have reached the server (a timeout inside the
    session): the legacy server likely counted an attempt, so verify() tries no other protocol (each would
    cost it one more, and a legacy server that slows down after wrong passwords slows down further).
    """

    def __init__(self, message: str, *, spent: bool = False) -> None:
        super().__init__(message)
        self.spent = spent


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


class _NamedTLSContext(ssl.SSLContext):
    """An SSLContext that checks the certificate for one configured name, whatever host was dialled.

    imaplib, poplib and smtplib pass the host they connected to as server_hostname; the legacy server's new
    address usually is not the name in its certificate (legacy.tls_server_name).
    """

    expected_name: str = ""

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=self.expected_name or server_hostname,
            session=session,
        )


def tls_context(cfg: LegacyConfig) -> ssl.SSLContext:
    ctx = _NamedTLSContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.expected_name = cfg.tls_server_name or cfg.host
    if cfg.tls_verify:
        if cfg.ca_file:
            ctx.load_verify_locations(cafile=cfg.ca_file)
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _imap_quote(raw: bytes) -> bytes | None:
    """An IMAP quoted string for raw, or None when it needs a literal (8-bit, CR, LF, NUL)."""
    if any(b > 0x7E or b < 0x20 for b in raw):
        return None
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


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


class LegacyVerifier:
    """Checks credentials against the legacy server per the [legacy] config section. Thread-safe."""

    def __init__(self, cfg: LegacyConfig) -> None:
        self.cfg = cfg
        self._context: ssl.SSLContext | None = None

    def _tls(self) -> ssl.SSLContext:
        if self._context is None:
            try:
                self._context = tls_context(self.cfg)
            except (OSError, ssl.SSLError) as e:
                raise LegacyUnavailable(f"cannot load legacy.ca_file: {e}") from None
        return self._context

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
        problems = []
        for proto in self.cfg.verify_with:
            try:
                methods[proto](login, password, client_ip)
            except LegacyUnavailable as e:
                problems.append(f"{proto}: {e}")
                log.info("legacy %s could not check %r: %s", proto, login, e)
                if e.spent:  # the server may have counted an attempt already: no second protocol
                    raise LegacyUnavailable("; ".join(problems), spent=True) from None
                continue
            return proto
        raise LegacyUnavailable("; ".join(problems) or "no protocol in legacy.verify_with")

    # --- IMAP --------------------------------------------------------------------------------------------
    def verify_imap(self, login: str, password: str, client_ip: str = "") -> None:
        cfg = self.cfg
        check_login(login)
        if not cfg.imap_port:
            raise LegacyUnavailable("no legacy IMAP port configured")
        try:
            if cfg.imap_tls == "implicit":
                imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                    cfg.host, cfg.imap_port, ssl_context=self._tls(), timeout=cfg.timeout
                )
            else:
                imap = imaplib.IMAP4(cfg.host, cfg.imap_port, timeout=cfg.timeout)
        except (OSError, imaplib.IMAP4.error) as e:
            raise LegacyUnavailable(f"IMAP connect to {cfg.host}:{cfg.imap_port}: {_clean(e, password)}") from None
        authenticated = False
        try:
            self._imap_session(imap, login, password, client_ip)
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

    def _imap_session(self, imap: imaplib.IMAP4, login: str, password: str, client_ip: str) -> None:
        if self.cfg.imap_tls == "starttls":
            if "STARTTLS" not in imap.capabilities:
                raise LegacyUnavailable("IMAP server does not offer STARTTLS")
            try:
                imap.starttls(ssl_context=self._tls())
            except imaplib.IMAP4.error as e:  # refused STARTTLS: "cannot check", never a wrong password
                raise LegacyUnavailable(f"IMAP STARTTLS failed: {e}") from None
        if imap.state != "NONAUTH":
            raise LegacyUnavailable("IMAP server pre-authenticated the connection")
        caps = set(imap.capabilities)
        if self.cfg.send_client_ip and client_ip and "ID" in caps:
            self._imap_id(imap, client_ip)
        user, pw = _raw(login), _raw(password)
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

    def _imap_id(self, imap: imaplib.IMAP4, client_ip: str) -> None:
        try:
            ip = str(ipaddress.ip_address(client_ip))
        except ValueError:
            return
        imaplib.Commands.setdefault("ID", ("NONAUTH", "AUTH", "SELECTED"))  # imaplib lacks RFC 2971
        typ, _ = imap._simple_command("ID", f'("x-originating-ip" "{ip}")')
        if typ != "OK":
            log.info("legacy IMAP refused ID; continuing without x-originating-ip")

    # --- POP3 --------------------------------------------------------------------------------------------
    def verify_pop3(self, login: str, password: str, client_ip: str = "") -> None:
        cfg = self.cfg
        check_login(login)
        if not cfg.pop3_port:
            raise LegacyUnavailable("no legacy POP3 port configured")
        try:
            if cfg.pop3_tls == "implicit":
                pop: poplib.POP3 = poplib.POP3_SSL(cfg.host, cfg.pop3_port, context=self._tls(), timeout=cfg.timeout)
            else:
                pop = poplib.POP3(cfg.host, cfg.pop3_port, timeout=cfg.timeout)
        except (OSError, poplib.error_proto) as e:
            raise LegacyUnavailable(f"POP3 connect to {cfg.host}:{cfg.pop3_port}: {_clean(e, password)}") from None
        authenticated = False
        try:
            self._pop3_session(pop, login, password, client_ip)
            authenticated = True
        except poplib.error_proto as e:
            text = _clean(e, password)
            m = _CODE.search(text)
            if not text.startswith("-ERR") or (m and m.group(1).upper() in _POP3_TEMPORARY):
                raise LegacyUnavailable(f"POP3: {text}") from None
            raise LegacyAuthError("pop3", text) from None
        except OSError as e:
            raise LegacyUnavailable(f"POP3: {_clean(e, password)}", spent=isinstance(e, TimeoutError)) from None
        finally:
            try:
                if authenticated:
                    pop.quit()  # nothing was marked deleted: UPDATE state changes nothing
                else:
                    pop.close()
            except (OSError, poplib.error_proto):
                pop.close()

    def _pop3_session(self, pop: poplib.POP3, login: str, password: str, client_ip: str = "") -> None:
        caps: dict[str, list[str]] = {}
        try:
            caps = pop.capa()
        except poplib.error_proto:
            caps = {}  # pre-RFC 2449 server: USER/PASS it is
        if self.cfg.pop3_tls == "starttls":
            if "STLS" not in caps:
                raise LegacyUnavailable("POP3 server does not offer STLS")
            try:
                pop.stls(context=self._tls())
            except poplib.error_proto as e:  # refused STLS: "cannot check", never a wrong password
                raise LegacyUnavailable(f"POP3 STLS failed: {e!s}"[:200]) from None
            caps = pop.capa()
        if "XCLIENT" in caps and self.cfg.send_client_ip and _is_ip(client_ip):
            # Dovecot's pop3-login offers XCLIENT to login_trusted_networks: its auth penalty and logs then
            # apply to the user's own address instead of ours (every check comes from this one host)
            try:
                _pop3_command(pop, b"XCLIENT ADDR=" + client_ip.encode("ascii"))
            except poplib.error_proto:
                log.info("legacy POP3 refused XCLIENT; continuing without the client address")
        user, pw = _raw(login), _raw(password)
        sasl = [m.upper() for m in caps.get("SASL", [])]
        if "PLAIN" in sasl:
            token = base64.b64encode(b"\0" + user + b"\0" + pw)
            _pop3_command(pop, b"AUTH PLAIN " + token)
            return
        if caps and "USER" not in caps:
            raise LegacyUnavailable("POP3: neither USER nor SASL PLAIN offered")
        if b"\r" in pw or b"\n" in pw:
            raise LegacyUnavailable("POP3: password cannot be sent with PASS and no SASL PLAIN")
        _pop3_command(pop, b"USER " + user)
        _pop3_command(pop, b"PASS " + pw)

    # --- SMTP AUTH ---------------------------------------------------------------------------------------
    def verify_smtp(self, login: str, password: str, client_ip: str = "") -> None:
        cfg = self.cfg
        check_login(login)
        if not cfg.submission_port:
            raise LegacyUnavailable("no legacy submission port configured")
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
