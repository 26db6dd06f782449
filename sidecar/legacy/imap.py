"""The legacy IMAP session: login (user; admin via SASL PLAIN authzid or master login), discovery, bulk fetch.

Discovery and small commands go through imapclient. The bulk FETCH of message bodies is written to
imapclient's underlying connection and read back with sidecar.wire.fetchparse (imapclient's own parser
costs several times the CPU, see fetchparse). A raw fetch abandoned half-way leaves the session unusable: it is closed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import imaplib
import itertools
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imapclient
from imapclient.exceptions import IMAPClientError, LoginError

from sidecar.legacy.errors import LegacyAuthFailed, LegacyError, LegacyProtocolError, LegacyUnavailable
from sidecar.legacy.folder import LegacyFolder
from sidecar.legacy.limit import LegacyBusy, LegacyLimiter, Permit
from sidecar.wire.fetchparse import (
    DEFAULT_MEMORY_LIMIT,
    FetchParseError,
    FetchParser,
    FetchResponse,
    Tagged,
)

BODY_ITEMS = b"(UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])"
READ_CHUNK = 1 << 16


class SourceError(LegacyError):
    """The legacy server refused or broke a command (permanent for this pass; the job runner retries)."""


class SourceAuthError(SourceError, LegacyAuthFailed):
    """The legacy server rejected the credentials."""


class SourceUnavailable(SourceError, LegacyUnavailable):
    """The legacy server cannot be reached or dropped the connection (temporary)."""


class SourceBusy(SourceUnavailable, LegacyBusy):
    """This node's connections toward the legacy server are all taken (limits.legacy_connections): the job is
    put back and tried again shortly, without counting an attempt."""


class SourceProtocolError(SourceUnavailable, LegacyProtocolError):
    """The legacy server sent a response we cannot parse (malformed FETCH, bad literal).

    Temporary: the pass stops, nothing partial is committed, the job runner retries (a broken proxy or a
    truncated connection often explains it). Persisting, it points at the server: the message names the
    folder and the UID range being fetched.
    """


@dataclasses.dataclass(frozen=True)
class SourceParams:
    """How to reach and log in to the legacy server for one account. Passwords never appear in repr()."""

    host: str
    user: str  # the account's legacy login name
    password: str = dataclasses.field(default="", repr=False)  # the user's own password (user mode)
    imap_port: int = 143
    imap_tls: str = "none"  # none | starttls | implicit
    pop3_port: int = 0  # 0: no POP3 UIDLs
    pop3_tls: str = "none"
    ssl_context: ssl.SSLContext | None = dataclasses.field(default=None, repr=False, compare=False)
    timeout: float = 30.0
    admin_user: str = ""  # non-empty: log in as admin on behalf of `user`
    admin_password: str = dataclasses.field(default="", repr=False)
    admin_mode: str = "authzid"  # authzid (SASL PLAIN authorization id) | master (user<sep>admin)
    master_separator: str = "*"
    # this node's cap on connections and bytes toward the legacy server (the job runner's); None: not counted
    limiter: LegacyLimiter | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def from_config(
        cls,
        legacy: Any,
        user: str,
        password: str = "",
        *,
        use_admin: bool = False,
        limiter: LegacyLimiter | None = None,
    ) -> SourceParams:
        """From sidecar.config.LegacyConfig; use_admin selects the admin credentials (bulk migration)."""
        ctx = None
        if legacy.imap_tls != "none" or legacy.pop3_tls != "none":
            from sidecar.legacy.tls import tls_context

            # the same verification as the password check: CA file, and the legacy server's certificate name
            # (tls_server_name) checked even though we connect to its new address
            ctx = tls_context(legacy)
        return cls(
            host=legacy.host,
            user=user,
            password=password,
            imap_port=legacy.imap_port,
            imap_tls=legacy.imap_tls,
            pop3_port=legacy.pop3_port,
            pop3_tls=legacy.pop3_tls,
            ssl_context=ctx,
            timeout=legacy.timeout,
            admin_user=legacy.admin_user if use_admin else "",
            admin_password=legacy.admin_password if use_admin else "",
            admin_mode=legacy.admin_mode,
            master_separator=legacy.master_separator,
            limiter=limiter,
        )


@dataclasses.dataclass(frozen=True)
class Namespaces:
    """RFC 2342 NAMESPACE: (prefix, separator) of each personal, other-users and shared namespace."""

    personal: tuple[tuple[str, str | None], ...] = ()
    other: tuple[tuple[str, str | None], ...] = ()
    shared: tuple[tuple[str, str | None], ...] = ()

    def foreign(self, name: str) -> str | None:
        """"other-users" or "shared" when a LIST name lies in such a namespace (and not in a personal one with a
        longer prefix), else None."""
        best: tuple[int, str | None] = (-1, None)
        for kind, spaces in (("personal", self.personal), ("other-users", self.other), ("shared", self.shared)):
            for prefix, _sep in spaces:
                if not prefix:
                    if best[0] < 0:
                        best = (0, None if kind == "personal" else kind)
                    continue
                p = prefix.rstrip(_sep or "") if _sep else prefix
                hit = name.startswith(prefix) or name == p
                if not hit and prefix.upper().startswith("INBOX"):
                    hit = name.upper().startswith(prefix.upper()) or name.upper() == p.upper()
                if hit and len(prefix) > best[0]:
                    best = (len(prefix), None if kind == "personal" else kind)
        return best[1]


@dataclasses.dataclass(frozen=True)
class FolderStatus:
    uidvalidity: int
    uidnext: int
    exists: int


class LegacySource:
    """One IMAP session on the legacy server for one account. Use as a context manager."""

    def __init__(self, params: SourceParams, *, wait: float | None = None) -> None:
        """wait: seconds to wait for a place under the node's legacy connection cap (None: the limiter's
        default; 0: SourceBusy at once when the cap is reached, as for a copy's extra connections)."""
        self.params = params
        self.wait = wait
        self.client: imapclient.IMAPClient | None = None
        self.capabilities: frozenset[str] = frozenset()
        self._tags = itertools.count(1)
        self._selected: str | None = None
        self._permit: Permit | None = None

    # --- session -----------------------------------------------------------------------------------------
    def __enter__(self) -> LegacySource:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        p = self.params
        if p.limiter is not None and self._permit is None:
            try:
                self._permit = p.limiter.acquire("imap", self.wait)
            except LegacyBusy as e:
                raise SourceBusy(str(e)) from None
        c = None
        try:
            c = imapclient.IMAPClient(
                p.host,
                port=p.imap_port,
                ssl=p.imap_tls == "implicit",
                ssl_context=p.ssl_context,
                timeout=p.timeout,
            )
            if p.imap_tls == "starttls":
                c.starttls(p.ssl_context or ssl.create_default_context())
        except (OSError, IMAPClientError) as e:
            if c is not None:  # STARTTLS refused or the handshake failed: drop the plaintext connection
                with contextlib.suppress(Exception):
                    c.shutdown()
            self._release()
            raise SourceUnavailable(f"cannot connect to legacy IMAP {p.host}:{p.imap_port}: {e}") from None
        self.client = c
        try:
            if p.admin_user and not p.user:  # the admin as itself (listing accounts: ops/inventory.py)
                c.login(p.admin_user, p.admin_password)
            elif p.admin_user and p.admin_mode == "master":
                c.login(f"{p.user}{p.master_separator}{p.admin_user}", p.admin_password)
            elif p.admin_user:
                c.plain_login(p.admin_user, p.admin_password, authorization_identity=p.user)
            else:
                # the same login as the password check (verify.imap_login): literal or SASL PLAIN for 8-bit,
                # quotes and backslashes escaped, CR/LF never on a command line
                from sidecar.legacy.verify import LegacyUnavailable, imap_login

                caps = {
                    (x.decode("ascii", "replace") if isinstance(x, bytes) else str(x)).upper()
                    for x in c.capabilities()
                }
                try:
                    imap_login(c._imap, p.user, p.password, caps)
                except LegacyUnavailable as e:
                    raise SourceUnavailable(f"legacy IMAP login not possible: {e}") from None
                except imaplib.IMAP4.abort:
                    raise
                except imaplib.IMAP4.error:
                    raise LoginError("refused") from None
                c._imap.state = "AUTH"
        except LoginError:
            self.close()
            who = (f"{p.admin_user} for {p.user}" if p.user else p.admin_user) if p.admin_user else p.user
            raise SourceAuthError(f"legacy IMAP login refused for {who}") from None
        except SourceUnavailable:
            self.close()
            raise
        except (OSError, IMAPClientError, imaplib.IMAP4.error) as e:
            self.close()
            raise SourceUnavailable(f"legacy IMAP login failed: {type(e).__name__}") from None
        self.capabilities = frozenset(
            x.decode("ascii", "replace").upper() if isinstance(x, bytes) else str(x).upper()
            for x in c.capabilities()
        )

    def close(self) -> None:
        c, self.client = self.client, None
        if c is not None:
            try:
                c.logout()
            except Exception:  # best effort on the way out
                with contextlib.suppress(Exception):
                    c.shutdown()
        self._release()

    def _release(self) -> None:
        permit, self._permit = self._permit, None
        if permit is not None:
            permit.release()

    def _c(self) -> imapclient.IMAPClient:
        if self.client is None:
            raise SourceUnavailable("legacy IMAP session is closed")
        return self.client

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except (OSError, imapclient.exceptions.AbortError) as e:
            self.client = None
            raise SourceUnavailable(f"legacy IMAP {what}: {type(e).__name__}: {e}") from None
        except IMAPClientError as e:
            raise SourceError(f"legacy IMAP {what}: {e}") from None

    # --- discovery ---------------------------------------------------------------------------------------
    def namespace(self) -> tuple[str, str | None]:
        """(prefix, separator) of the personal namespace (NAMESPACE, else LIST "" "")."""
        c = self._c()
        if "NAMESPACE" in self.capabilities:
            ns = self._call("NAMESPACE", c.namespace)
            if ns.personal:
                prefix, sep = ns.personal[0]
                return _s(prefix), _s(sep) if sep is not None else None
        raw = self._call("LIST", c._imap.list, '""', '""')
        sep = None
        if raw[0] == "OK" and raw[1] and raw[1][0]:
            parts = raw[1][0].split(b'"')
            if len(parts) >= 3:
                sep = parts[1].decode()
        return "", sep

    def namespaces(self) -> Namespaces:
        """Every namespace the server announces (empty when it has no NAMESPACE capability)."""
        if "NAMESPACE" not in self.capabilities:
            return Namespaces()
        ns = self._call("NAMESPACE", self._c().namespace)

        def conv(group: Any) -> tuple[tuple[str, str | None], ...]:
            return tuple((_s(p), _s(d) if d is not None else None) for p, d in (group or ()))

        return Namespaces(conv(ns.personal), conv(ns.other), conv(ns.shared))

    def list_names(self, pattern: str) -> list[str]:
        """Names matching `LIST "" pattern` (decoded)."""
        return [_s(name) for _flags, _delim, name in self._call("LIST", self._c().list_folders, "", pattern)]

    def list_folders(self) -> list[LegacyFolder]:
        """All folders with their LIST flags (special-use flags included where the server sends them)."""
        c = self._c()
        if "XLIST" in self.capabilities and "SPECIAL-USE" not in self.capabilities:
            rows = self._call("XLIST", c.xlist_folders)
        else:
            rows = self._call("LIST", c.list_folders)
        out = []
        for flags, delim, name in rows:
            out.append(
                LegacyFolder(_s(name), _s(delim) if delim is not None else None, tuple(_s(f) for f in flags))
            )
        return out

    def subscribed(self) -> list[str]:
        c = self._c()
        return [_s(name) for _flags, _delim, name in self._call("LSUB", c.list_sub_folders)]

    def examine(self, folder: str) -> FolderStatus:
        c = self._c()
        info = self._call(f"EXAMINE {folder}", c.select_folder, folder, readonly=True)
        self._selected = folder
        uidvalidity = int(info.get(b"UIDVALIDITY", 0))
        if not uidvalidity:
            raise SourceError(f"legacy folder {folder!r} has no UIDVALIDITY")
        exists = int(info.get(b"EXISTS", 0))
        uidnext = int(info.get(b"UIDNEXT", 0))
        return FolderStatus(uidvalidity, uidnext, exists)

    def status(self, folder: str) -> FolderStatus:
        c = self._c()
        st = self._call(f"STATUS {folder}", c.folder_status, folder, ["MESSAGES", "UIDNEXT", "UIDVALIDITY"])
        return FolderStatus(
            int(st.get(b"UIDVALIDITY", 0)), int(st.get(b"UIDNEXT", 0)), int(st.get(b"MESSAGES", 0))
        )

    # --- raw fetch ---------------------------------------------------------------------------------------
    def fetch(
        self,
        uid_set: str,
        items: bytes = BODY_ITEMS,
        *,
        spool_dir: Path | None = None,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
    ) -> Iterator[FetchResponse]:
        """`UID FETCH uid_set items` on the selected folder, streamed; abandoning it ends the session."""
        c = self._c()
        imap = c._imap
        tag = b"AP%d" % next(self._tags)
        parser = FetchParser(spool_dir=spool_dir, memory_limit=memory_limit)
        limiter = self.params.limiter
        finished = False
        try:
            imap.send(tag + b" UID FETCH " + uid_set.encode("ascii") + b" " + items + b"\r\n")
            reader = imap.file
            while not parser.done:
                data = reader.read1(READ_CHUNK) if hasattr(reader, "read1") else reader.read(READ_CHUNK)
                if not data:
                    raise SourceUnavailable("legacy IMAP closed the connection during FETCH")
                if limiter is not None:  # limits.legacy_bytes_per_second
                    limiter.throttle(len(data))
                for ev in parser.feed(data):
                    if isinstance(ev, FetchResponse):
                        yield ev
                    elif isinstance(ev, Tagged):
                        if ev.tag != tag:
                            raise SourceError(f"unexpected tagged reply {ev.tag!r}")
                        if ev.status != "OK":
                            raise SourceError(f"legacy UID FETCH failed: {ev.status} {ev.text}")
            finished = True
        except (TimeoutError, OSError) as e:
            raise SourceUnavailable(f"legacy IMAP FETCH: {type(e).__name__}: {e}") from None
        except FetchParseError as e:
            where = f" in {self._selected!r}" if self._selected else ""
            raise SourceProtocolError(
                f"legacy IMAP sent a malformed FETCH response{where} (UID {uid_set}): {e}"
            ) from None
        finally:
            if not finished:
                parser.abort()
                self._drop()

    def _drop(self) -> None:
        """The connection is mid-response: it cannot be reused."""
        c, self.client = self.client, None
        if c is not None:
            with contextlib.suppress(Exception):
                c.shutdown()
        self._release()

    def uid_flags(self, uid_set: str = "1:*") -> dict[int, tuple[str, ...]]:
        """UID -> flags for the selected folder (raw fetch: cheap even for large folders)."""
        out: dict[int, tuple[str, ...]] = {}
        for r in self.fetch(uid_set, b"(UID FLAGS)"):
            if r.uid is not None:
                out[r.uid] = r.flags or ()
        return out


def _s(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8", "surrogateescape")
    return str(x)
