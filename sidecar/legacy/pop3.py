"""POP3 UIDLs: read the legacy POP3 UIDL list and match each POP3 message to an IMAP INBOX message.

Same idea as Dovecot's pop3_migration plugin: POP3 and IMAP show the same INBOX, usually in the same order,
but share no identifier. Each side's messages are keyed by a hash of their header block (normalised so that
line endings and trailing whitespace do not matter); equal keys are paired in order (first POP3 message with
a key to the lowest IMAP UID with that key). Messages that pair with nothing are reported, not guessed.

The POP3 session is closed without QUIT, so the legacy server commits nothing (no \\Seen from our reads, no
deletions): RFC 1939 enters the UPDATE state only on QUIT.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import hashlib
import poplib
import ssl
from collections.abc import Iterable, Mapping

from sidecar.legacy.imap import SourceAuthError, SourceBusy, SourceError, SourceParams, SourceUnavailable
from sidecar.legacy.limit import LegacyBusy, Permit

# header fields some servers add or rewrite in only one of the two views (mbox-backed servers mostly)
VOLATILE_HEADERS = frozenset(
    {
        b"status",
        b"x-status",
        b"x-uid",
        b"x-keywords",
        b"x-imap",
        b"x-imapbase",
        b"content-length",
        b"x-mozilla-status",
        b"x-mozilla-status2",
    }
)


def header_hash(header: bytes | Iterable[bytes]) -> str:
    """Hash of a header block (bytes, or lines without line ends as poplib returns them)."""
    lines = header.splitlines() if isinstance(header, bytes) else list(header)
    kept: list[bytes] = []
    skip = False
    for line in lines:
        line = line.rstrip(b"\r\n")
        if not line.strip():
            break  # end of header
        if line[:1] in (b" ", b"\t"):
            if not skip:
                kept.append(b" " + line.strip())
            continue
        name = line.split(b":", 1)[0].strip().lower()
        skip = name in VOLATILE_HEADERS
        if not skip:
            kept.append(line.rstrip())
    return hashlib.sha256(b"\n".join(kept)).hexdigest()


@dataclasses.dataclass(frozen=True)
class Pop3Message:
    number: int
    uidl: str
    size: int


@dataclasses.dataclass
class MatchResult:
    uidls: dict[int, str]  # IMAP UID -> POP3 UIDL
    unmatched_pop3: list[str]  # UIDLs without an IMAP message
    unmatched_imap: list[int]  # IMAP UIDs without a POP3 message


def match(pop3: Iterable[tuple[str, str]], imap: Mapping[int, str]) -> MatchResult:
    """Pair (uidl, header hash) in POP3 order with {imap uid: header hash}."""
    by_hash: dict[str, collections.deque[int]] = collections.defaultdict(collections.deque)
    for uid in sorted(imap):
        by_hash[imap[uid]].append(uid)
    uidls: dict[int, str] = {}
    unmatched: list[str] = []
    for uidl, h in pop3:
        queue = by_hash.get(h)
        if queue:
            uidls[queue.popleft()] = uidl
        else:
            unmatched.append(uidl)
    rest = sorted(uid for q in by_hash.values() for uid in q)
    return MatchResult(uidls, unmatched, rest)


class LegacyPop3:
    """A read-only POP3 session on the legacy server for one account."""

    def __init__(self, params: SourceParams) -> None:
        self.params = params
        self.conn: poplib.POP3 | None = None
        self._permit: Permit | None = None

    def __enter__(self) -> LegacyPop3:
        p = self.params
        if p.limiter is not None:
            try:
                self._permit = p.limiter.acquire("pop3")
            except LegacyBusy as e:
                raise SourceBusy(str(e)) from None
        try:
            if p.pop3_tls == "implicit":
                conn: poplib.POP3 = poplib.POP3_SSL(
                    p.host,
                    p.pop3_port,
                    timeout=p.timeout,
                    context=p.ssl_context or ssl.create_default_context(),
                )
            else:
                conn = poplib.POP3(p.host, p.pop3_port, timeout=p.timeout)
                if p.pop3_tls == "starttls":
                    conn.stls(p.ssl_context or ssl.create_default_context())
        except (OSError, poplib.error_proto) as e:
            self._drop()
            raise SourceUnavailable(f"cannot connect to legacy POP3 {p.host}:{p.pop3_port}: {e}") from None
        self.conn = conn
        try:
            if p.admin_user and p.admin_mode == "authzid":
                token = f"{p.user}\0{p.admin_user}\0{p.admin_password}".encode()
                # poplib has no AUTH; the SASL PLAIN exchange is one line (RFC 5034 initial response)
                conn._shortcmd("AUTH PLAIN " + base64.b64encode(token).decode("ascii"))  # type: ignore[attr-defined]
            elif p.admin_user:
                conn.user(f"{p.user}{p.master_separator}{p.admin_user}")
                conn.pass_(p.admin_password)
            elif any(c in p.password for c in "\r\n\0") or any(c in p.user for c in "\r\n\0"):
                # never on a command line (a CR/LF would start a second command): SASL PLAIN or nothing
                if "\0" in p.password or "\0" in p.user:
                    raise poplib.error_proto("NUL in credentials")
                token = f"\0{p.user}\0{p.password}".encode()
                conn._shortcmd("AUTH PLAIN " + base64.b64encode(token).decode("ascii"))  # type: ignore[attr-defined]
            else:
                conn.user(p.user)
                conn.pass_(p.password)  # poplib sends UTF-8
        except poplib.error_proto:
            self._drop()
            raise SourceAuthError(f"legacy POP3 login refused for {p.user}") from None
        except OSError as e:
            self._drop()
            raise SourceUnavailable(f"legacy POP3 login failed: {type(e).__name__}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self._drop()

    def _drop(self) -> None:
        """Close without QUIT: the server commits nothing."""
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()
        permit, self._permit = self._permit, None
        if permit is not None:
            permit.release()

    def _c(self) -> poplib.POP3:
        if self.conn is None:
            raise SourceUnavailable("legacy POP3 session is closed")
        return self.conn

    def messages(self) -> list[Pop3Message]:
        c = self._c()
        try:
            _resp, uidl_lines, _ = c.uidl()
            _resp, list_lines, _ = c.list()
        except poplib.error_proto as e:
            raise SourceError(f"legacy POP3 UIDL/LIST: {e}") from None
        except OSError as e:
            raise SourceUnavailable(f"legacy POP3: {type(e).__name__}") from None
        sizes = {}
        for line in list_lines:
            num, _, size = line.decode("ascii", "replace").partition(" ")
            sizes[int(num)] = int(size.split()[0]) if size.strip() else 0
        out = []
        for line in uidl_lines:
            num, _, uidl = line.decode("utf-8", "surrogateescape").partition(" ")
            out.append(Pop3Message(int(num), uidl.strip(), sizes.get(int(num), 0)))
        return out

    def header_hash(self, number: int) -> str:
        c = self._c()
        try:
            _resp, lines, _ = c.top(number, 0)
        except poplib.error_proto as e:
            raise SourceError(f"legacy POP3 TOP {number}: {e}") from None
        except OSError as e:
            raise SourceUnavailable(f"legacy POP3: {type(e).__name__}") from None
        return header_hash(lines)

    def retr(self, number: int) -> bytes:
        """The whole message (CRLF line ends, dot-stuffing undone). Read in one piece: poplib has no stream."""
        c = self._c()
        try:
            _resp, lines, _ = c.retr(number)
        except poplib.error_proto as e:
            raise SourceError(f"legacy POP3 RETR {number}: {e}") from None
        except OSError as e:
            raise SourceUnavailable(f"legacy POP3: {type(e).__name__}") from None
        data = b"".join(line + b"\r\n" for line in lines)
        if self.params.limiter is not None:  # limits.legacy_bytes_per_second
            self.params.limiter.throttle(len(data))
        return data
