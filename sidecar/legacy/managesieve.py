"""ManageSieve (RFC 5804) toward the legacy server: the client the Sieve copy and `autoport doctor` use.

Our own client (about 250 lines): sievelib (PyPI, Debian python3-sievelib) cannot use the TLS context the rest of
autoport uses (CA file plus the certificate name in legacy.tls_server_name, checked whatever address we dial),
has no bound on what the server sends, and would be one more dependency for LISTSCRIPTS and GETSCRIPT. Only what
the copy needs: greeting and capabilities, STARTTLS (legacy.sieve_tls, or implicit TLS), AUTHENTICATE "PLAIN"
(authzid for admin_mode = authzid, user*admin for master), LISTSCRIPTS, GETSCRIPT, LOGOUT. Errors belong to the
legacy error family (legacy/errors.py); the password is never in a message.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import re
import socket
import ssl

from sidecar.legacy.errors import LegacyAuthFailed, LegacyError, LegacyProtocolError, LegacyUnavailable
from sidecar.legacy.limit import LegacyBusy, LegacyLimiter, Permit

log = logging.getLogger("sidecar.legacy.managesieve")

MAX_LINE = 8192  # one response line (capabilities, a LISTSCRIPTS entry)
MAX_LINES = 1000  # lines in one response (capabilities, scripts listed)
MAX_SCRIPT_BYTES = 1 << 20  # a Sieve script is a few KiB; Dovecot's default sieve_max_script_size is 1 MiB
MAX_SCRIPTS = 100
MAX_DISCARD = 64 << 20  # an oversized script is read and dropped up to this size; beyond, the session ends
_LITERAL = re.compile(rb"\{(\d{1,10})\+?\}$")
# a script name that is a safe file name: no path separators, no leading dot, no control characters
_SAFE_NAME = re.compile(r"^[^/\x00-\x1f\x7f.][^/\x00-\x1f\x7f]{0,127}$")



class SieveError(LegacyError):
    """Base class of ManageSieve errors."""


class SieveAuthError(SieveError, LegacyAuthFailed):
    """The legacy ManageSieve server refused the credentials."""


class SieveUnavailable(SieveError, LegacyUnavailable):
    """Cannot reach the legacy ManageSieve server, or it hung up (temporary)."""


class SieveProtocolError(SieveUnavailable, LegacyProtocolError):
    """A reply that is not ManageSieve as we know it."""


class SieveScriptError(SieveError):
    """One script could not be carried over (too big, a name that is no file name, unreadable)."""


@dataclasses.dataclass(frozen=True)
class Reply:
    status: str  # OK | NO | BYE
    code: str  # response code, e.g. "TRYLATER", "" when none
    text: str  # human-readable text, "" when none
    lines: tuple[tuple[bytes | str, ...], ...]  # the data lines before the status line, tokenised


def _clean(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)[:200]


class ManageSieveClient:
    """One ManageSieve session. Use as a context manager; every read is bounded and has a timeout."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: str = "starttls",
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        limiter: LegacyLimiter | None = None,
    ) -> None:
        if tls not in ("none", "starttls", "implicit"):
            raise ValueError(f"tls must be none, starttls or implicit, not {tls!r}")
        self.host, self.port, self.tls, self.timeout = host, port, tls, timeout
        self.context = ssl_context
        self.sock: socket.socket | None = None
        self._buf = b""
        self.capabilities: dict[str, str] = {}
        self.oversized = 0  # size of the last literal dropped for being over the limit
        self.limiter = limiter  # the job runner's cap on legacy connections (None: not counted, e.g. doctor)
        self._permit: Permit | None = None

    def __enter__(self) -> ManageSieveClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ----------------------------------------------------------------------------------------
    def _ctx(self) -> ssl.SSLContext:
        return self.context or ssl.create_default_context()

    def connect(self) -> None:
        where = f"{self.host}:{self.port}"
        if self.limiter is not None and self._permit is None:
            try:
                self._permit = self.limiter.acquire("sieve")
            except LegacyBusy as e:
                raise SieveUnavailable(str(e)) from None
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as e:
            self.close()
            raise SieveUnavailable(f"cannot connect to legacy ManageSieve {where}: {e.strerror or e}") from None
        self.sock = sock
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        where = f"{self.host}:{self.port}"
        if self.tls == "implicit":
            self._wrap()
        reply = self._read_reply()
        if reply.status != "OK":
            raise SieveUnavailable(f"legacy ManageSieve {where} greeted with {reply.status} {_clean(reply.text)}")
        self.capabilities = _capabilities(reply)
        if self.tls == "starttls":
            if "STARTTLS" not in self.capabilities:
                raise SieveUnavailable(f"legacy ManageSieve {where} does not offer STARTTLS (legacy.sieve_tls)")
            self._expect_ok("STARTTLS", b"STARTTLS")
            self._wrap()
            # RFC 5804 2.2: the server sends its capabilities again after the TLS handshake
            self.capabilities = _capabilities(self._read_reply())

    def _wrap(self) -> None:
        assert self.sock is not None
        if self._buf:
            raise SieveProtocolError("legacy ManageSieve sent data before the TLS handshake")
        try:
            self.sock = self._ctx().wrap_socket(self.sock, server_hostname=self.host)
        except ssl.SSLCertVerificationError as e:
            self.close()
            raise SieveUnavailable(
                f"legacy ManageSieve {self.host}:{self.port}: certificate not trusted: {e.verify_message}"
            ) from None
        except (OSError, ssl.SSLError) as e:
            self.close()
            raise SieveUnavailable(f"legacy ManageSieve {self.host}:{self.port}: TLS failed: {e}") from None

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        permit, self._permit = self._permit, None
        if permit is not None:
            permit.release()

    def _send(self, data: bytes) -> None:
        if self.sock is None:
            raise SieveUnavailable("legacy ManageSieve session is closed")
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.close()
            raise SieveUnavailable(f"legacy ManageSieve: send failed: {e}") from None

    def _fill(self) -> None:
        if self.sock is None:
            raise SieveUnavailable("legacy ManageSieve session is closed")
        try:
            data = self.sock.recv(65536)
        except OSError as e:
            self.close()
            raise SieveUnavailable(f"legacy ManageSieve: {type(e).__name__}: {e}") from None
        if not data:
            self.close()
            raise SieveUnavailable("legacy ManageSieve closed the connection")
        self._buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise SieveProtocolError(f"legacy ManageSieve sent a line longer than {MAX_LINE} bytes")
            self._fill()
        line, self._buf = self._buf.split(b"\r\n", 1)
        if len(line) > MAX_LINE:
            raise SieveProtocolError(f"legacy ManageSieve sent a line longer than {MAX_LINE} bytes")
        return line

    def _discard(self, n: int) -> None:
        while n > 0:
            if not self._buf:
                self._fill()
            k = min(n, len(self._buf))
            self._buf = self._buf[k:]
            n -= k

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    # --- responses ----------------------------------------------------------------------------------------
    def _tokens(self, max_literal: int) -> tuple[bytes | str, ...]:
        """One response line as tokens: atoms (str, upper-cased), strings and literals (bytes)."""
        out: list[bytes | str] = []
        line = self._line()
        while True:
            i = 0
            while i < len(line):
                c = line[i : i + 1]
                if c == b" ":
                    i += 1
                elif c == b'"':
                    j, buf = i + 1, bytearray()
                    while j < len(line) and line[j : j + 1] != b'"':
                        if line[j : j + 1] == b"\\" and j + 1 < len(line):
                            j += 1
                        buf += line[j : j + 1]
                        j += 1
                    if j >= len(line):
                        raise SieveProtocolError("legacy ManageSieve sent an unterminated string")
                    out.append(bytes(buf))
                    i = j + 1
                elif c == b"(":
                    j = line.find(b")", i)
                    if j < 0:
                        raise SieveProtocolError("legacy ManageSieve sent an unterminated response code")
                    out.append("(" + line[i + 1 : j].decode("utf-8", "replace").upper() + ")")
                    i = j + 1
                else:
                    j = line.find(b" ", i)
                    j = len(line) if j < 0 else j
                    out.append(line[i:j].decode("utf-8", "replace"))
                    i = j
            m = _LITERAL.search(line)
            if m is None or not out or not isinstance(out[-1], str) or not _LITERAL.match(out[-1].encode()):
                return tuple(out)
            size = int(m.group(1))
            if size > max_literal:
                # skip it so the session stays in step (the next script can still be read), within a bound
                if size > MAX_DISCARD:
                    self.close()
                    raise SieveProtocolError(f"legacy ManageSieve announced a literal of {size} bytes")
                self._discard(size)
                self.oversized = size
                out[-1] = b""
            else:
                out[-1] = self._exactly(size)
            line = self._line()  # the rest of the line after the literal (often empty)

    def _read_reply(self, max_literal: int = MAX_LINE) -> Reply:
        lines: list[tuple[bytes | str, ...]] = []
        for _ in range(MAX_LINES):
            toks = self._tokens(max_literal)
            head = toks[0].upper() if toks and isinstance(toks[0], str) else ""
            if head in ("OK", "NO", "BYE"):
                code = ""
                rest = list(toks[1:])
                first = rest[0] if rest else b""
                if isinstance(first, str) and first.startswith("("):
                    code = first[1:-1]
                    rest.pop(0)
                text = rest[0] if rest else b""
                text_s = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
                if head == "BYE":
                    self.close()
                    raise SieveUnavailable(f"legacy ManageSieve said BYE {code} {_clean(text_s)}".strip())
                return Reply(head, code, text_s, tuple(lines))
            lines.append(toks)
        raise SieveProtocolError(f"legacy ManageSieve sent more than {MAX_LINES} lines in one response")

    def _expect_ok(self, what: str, command: bytes, max_literal: int = MAX_LINE) -> Reply:
        self._send(command + b"\r\n")
        reply = self._read_reply(max_literal)
        if reply.status != "OK":
            detail = f"{reply.code} {_clean(reply.text)}".strip()
            raise SieveError(f"legacy ManageSieve {what} failed: {detail}")
        return reply

    # --- commands -----------------------------------------------------------------------------------------
    def authenticate(self, authcid: str, password: str, authzid: str = "") -> None:
        """AUTHENTICATE "PLAIN" with an initial response; SieveAuthError when refused."""
        sasl = self.capabilities.get("SASL", "").upper().split()
        if sasl and "PLAIN" not in sasl:
            raise SieveAuthError(f"legacy ManageSieve does not offer SASL PLAIN (offers {' '.join(sasl)})")
        blob = base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode())
        self._send(b'AUTHENTICATE "PLAIN" "' + blob + b'"\r\n')
        del blob
        reply = self._read_reply()
        if reply.status != "OK":
            who = f"{authcid} for {authzid}" if authzid else authcid
            raise SieveAuthError(f"legacy ManageSieve refused the login of {who}: {_clean(reply.text)}")

    def listscripts(self) -> list[tuple[str, bool]]:
        """[(script name, active)] in the server's order."""
        reply = self._expect_ok("LISTSCRIPTS", b"LISTSCRIPTS")
        out: list[tuple[str, bool]] = []
        for toks in reply.lines:
            if not toks or not isinstance(toks[0], bytes):
                raise SieveProtocolError("legacy ManageSieve LISTSCRIPTS: a line without a script name")
            active = len(toks) > 1 and isinstance(toks[1], str) and toks[1].upper() == "ACTIVE"
            out.append((toks[0].decode("utf-8", "replace"), active))
        return out

    def getscript(self, name: str, *, max_bytes: int = MAX_SCRIPT_BYTES) -> bytes:
        """The script's body, byte for byte; SieveScriptError when too big or unreadable."""
        raw = name.encode()
        if any(b in raw for b in (0, 10, 13)):
            raise SieveScriptError(f"script name {name!r} cannot be sent")
        quoted = b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        self._send(b"GETSCRIPT " + quoted + b"\r\n")
        self.oversized = 0
        reply = self._read_reply(max_bytes)
        if self.oversized:
            raise SieveScriptError(f"script {name!r} too big ({self.oversized} bytes, limit {max_bytes})")
        if reply.status != "OK":
            raise SieveScriptError(f"script {name!r} unreadable: {reply.code} {_clean(reply.text)}".strip())
        if len(reply.lines) != 1 or not reply.lines[0] or not isinstance(reply.lines[0][0], bytes):
            raise SieveProtocolError(f"legacy ManageSieve GETSCRIPT {name!r}: no script in the reply")
        return reply.lines[0][0]

    def logout(self) -> None:
        with contextlib.suppress(SieveError):
            self._send(b"LOGOUT\r\n")
            with contextlib.suppress(SieveUnavailable):
                self._read_reply()
        self.close()


def _capabilities(reply: Reply) -> dict[str, str]:
    caps: dict[str, str] = {}
    for toks in reply.lines:
        if toks and isinstance(toks[0], bytes):
            key = toks[0].decode("utf-8", "replace").upper()
            value = toks[1] if len(toks) > 1 else b""
            caps[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return caps
