"""What the legacy server offered its clients (ports, mechanisms, size), so the target offers no less.

A client configured for the legacy server keeps its settings after the switch: SMTP AUTH on 465 with implicit
TLS, or on port 25; a plain-text login where the legacy server allowed one; a 20 MB attachment that the legacy
server took. `probe()` asks the legacy server without logging in:
- SMTP (legacy.smtp_port, legacy.submission_port, legacy.smtps_port with implicit TLS): EHLO, after STARTTLS
  when offered; AUTH mechanisms and SIZE;
- IMAP (legacy.imap_port, unless implicit TLS): LOGINDISABLED in the greeting's capabilities means no
  plain-text login; without IMAP, POP3: whether USER is accepted before STLS (the session ends before PASS).
`settings()` turns that into the [target] keys (smtps, smtp_auth_on_25, plaintext_auth, message_size_limit);
`autoport doctor` prints them when the configuration offers less, and the lab applies them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import imaplib
import poplib
import smtplib
import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.config import Config, LegacyConfig

POSTFIX_DEFAULT_SIZE = 10240000  # Postfix's message_size_limit default


@dataclasses.dataclass
class SmtpOffer:
    port: int
    reachable: bool = False
    auth: tuple[str, ...] = ()  # mechanisms, after STARTTLS when offered
    auth_plaintext: bool = False  # AUTH advertised before TLS
    size: int | None = None  # SIZE (0: no limit announced as "SIZE 0"); None: no SIZE
    error: str = ""


@dataclasses.dataclass
class LegacyOffer:
    smtp: SmtpOffer
    submission: SmtpOffer
    smtps: SmtpOffer
    plaintext_login: bool | None = None  # None: could not tell
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def largest_size(self) -> int | None:
        """The largest SIZE any legacy SMTP port announced: 0 when one announced no limit ("SIZE 0" or bare
        "SIZE"), None when none announced SIZE."""
        sizes = [o.size for o in (self.smtp, self.submission, self.smtps) if o.size is not None]
        if not sizes:
            return None
        return 0 if 0 in sizes else max(sizes)


def _ehlo(legacy: LegacyConfig, port: int, implicit: bool, ctx: ssl.SSLContext, timeout: float) -> SmtpOffer:
    offer = SmtpOffer(port)
    try:
        s = (smtplib.SMTP_SSL(legacy.host, port, context=ctx, timeout=timeout) if implicit
             else smtplib.SMTP(legacy.host, port, timeout=timeout))  # fmt: skip
    except (OSError, smtplib.SMTPException) as e:
        offer.error = str(e) or type(e).__name__
        return offer
    try:
        s.ehlo()
        if not implicit and s.has_extn("auth"):
            offer.auth_plaintext = True
        if not implicit and s.has_extn("starttls"):
            s.starttls(context=ctx)
            s.ehlo()
        offer.reachable = True
        offer.auth = tuple(s.esmtp_features.get("auth", "").upper().split())
        if s.has_extn("size"):
            value = s.esmtp_features.get("size", "").strip()
            offer.size = int(value) if value.isdigit() else 0
    except (OSError, smtplib.SMTPException, ValueError) as e:
        offer.error = str(e) or type(e).__name__
    finally:
        with contextlib.suppress(Exception):
            s.quit()
    return offer


def _imap_plaintext(legacy: LegacyConfig, timeout: float) -> bool | None:
    try:
        c = imaplib.IMAP4(legacy.host, legacy.imap_port, timeout=timeout)
    except (OSError, imaplib.IMAP4.error):
        return None
    try:
        return "LOGINDISABLED" not in c.capabilities
    finally:
        with contextlib.suppress(Exception):
            c.logout()


def _pop3_plaintext(legacy: LegacyConfig, timeout: float) -> bool | None:
    try:
        p = poplib.POP3(legacy.host, legacy.pop3_port, timeout=timeout)
    except (OSError, poplib.error_proto):
        return None
    try:
        p.user("autoport-probe")  # never followed by PASS: the session ends here
        return True
    except poplib.error_proto:
        return False
    except OSError:
        return None
    finally:
        with contextlib.suppress(Exception):
            p.close()


def probe(legacy: LegacyConfig, *, timeout: float = 10.0) -> LegacyOffer:
    """Ask the legacy server what it offers (module doc). Never raises for an unreachable port."""
    from sidecar.legacy.verify import tls_context

    ctx = tls_context(legacy)
    t = min(legacy.timeout, timeout)

    def smtp(port: int, implicit: bool) -> SmtpOffer:
        return _ehlo(legacy, port, implicit, ctx, t) if port else SmtpOffer(0)

    offer = LegacyOffer(
        smtp(legacy.smtp_port, legacy.smtp_tls == "implicit"),
        smtp(legacy.submission_port, legacy.submission_tls == "implicit"),
        smtp(legacy.smtps_port, True),
    )
    if legacy.imap_port and legacy.imap_tls != "implicit":
        offer.plaintext_login = _imap_plaintext(legacy, t)
    elif legacy.pop3_port and legacy.pop3_tls != "implicit":
        offer.plaintext_login = _pop3_plaintext(legacy, t)
    if offer.plaintext_login is None:
        offer.notes.append("whether the legacy server allows plain-text logins could not be told")
    return offer


def settings(offer: LegacyOffer) -> dict[str, Any]:
    """The [target] keys that offer what the legacy server offered."""
    size = offer.largest_size
    if size is None or (size and size < POSTFIX_DEFAULT_SIZE):
        size = POSTFIX_DEFAULT_SIZE  # never below Postfix's default either
    return {
        "smtps": offer.smtps.reachable and bool(offer.smtps.auth),
        "smtp_auth_on_25": offer.smtp.reachable and bool(offer.smtp.auth),
        "plaintext_auth": bool(offer.plaintext_login)
        or any(o.auth_plaintext for o in (offer.smtp, offer.submission)),
        "message_size_limit": size,  # 0: no limit, as the legacy server announced
    }


def shortfalls(cfg: Config, offer: LegacyOffer) -> list[str]:
    """Where the configuration offers less than the legacy server did: one `key = value` line each."""
    want = settings(offer)
    t = cfg.target
    out = []
    if want["smtps"] and not t.smtps:
        out.append("smtps = true")
    if want["smtp_auth_on_25"] and not t.smtp_auth_on_25:
        out.append("smtp_auth_on_25 = true")
    if want["plaintext_auth"] and not t.plaintext_auth:
        out.append("plaintext_auth = true")
    have, size = t.message_size_limit, want["message_size_limit"]
    if have and (size == 0 or have < size):
        out.append(f"message_size_limit = {size}")
    return out
