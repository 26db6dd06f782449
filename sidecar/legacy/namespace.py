"""The target's IMAP namespace (prefix and separator), by default the one the legacy server shows.

Clients remember folders by name: a Cyrus or Courier server shows "INBOX.Sent" (prefix "INBOX.", separator
"."), and a target showing "Sent" instead makes clients download the folder again and lose which folder is
their Sent/Drafts/Trash; Sieve `fileinto "INBOX.Junk"` would name a folder that does not exist. So the target
shows the legacy namespace, rendered into Dovecot's `namespace inbox { prefix separator }`
(dovecot/conf.d/10-mail.conf.j2). Only what IMAP shows changes: on disk the mailbox stays Maildir++ (".Sent",
".Archive.2023"), the subscriptions file keeps prefix-less names with TAB between levels (checked on Dovecot
2.3.19: the same file serves prefix "" "/" and prefix "INBOX." "."), dovecot-uidlist is unaffected.

More (the reasons and limits behind this module): docs/modules.md, sidecar/legacy/namespace.py.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.config import Config, LegacyConfig

DEFAULT = ("", "/")
SEPARATORS = ("/", ".")


@dataclasses.dataclass(frozen=True)
class Namespace:
    prefix: str
    separator: str

    def name(self, target: str) -> str:
        """What a client sees for a target folder ("Archive/2023", the copier's internal form)."""
        if target.upper() == "INBOX":
            return "INBOX"
        return self.prefix + target.replace("/", self.separator)


def probe(legacy: LegacyConfig, login: str, password: str = "", *, use_admin: bool = False) -> tuple[str, str]:
    """(prefix, separator) of the legacy personal namespace, asked over IMAP as `login`.

    Raises sidecar.legacy.imap.SourceError (and subclasses) when the legacy server cannot be asked. A legacy
    server without IMAP (imap_port 0) has no folders: DEFAULT.
    """
    if not legacy.imap_port:
        return DEFAULT
    from sidecar.legacy.imap import LegacySource, SourceParams

    params = SourceParams.from_config(legacy, login, password, use_admin=use_admin)
    with LegacySource(params) as src:
        prefix, sep = src.namespace()
    return prefix, sep or "/"


def resolve(cfg: Config, legacy_ns: tuple[str, str] | None = None) -> Namespace:
    """The namespace to render: explicit [mail] keys win, "auto" takes legacy_ns (else DEFAULT)."""
    want_prefix, want_sep = cfg.mail.namespace_prefix, cfg.mail.namespace_separator
    lp, ls = legacy_ns or DEFAULT
    if ls not in SEPARATORS:
        lp, ls = lp.replace(ls, "/") if lp.endswith(ls) else "", "/"
    sep = ls if want_sep == "auto" else want_sep
    if want_prefix != "auto":
        prefix = want_prefix
    elif lp.endswith(ls) and ls != sep:  # the legacy prefix, with the separator chosen here
        prefix = lp[: -len(ls)] + sep
    else:
        prefix = lp
    if prefix and not prefix.endswith(sep):
        prefix = ""  # a prefix Dovecot cannot show with this separator (e.g. "Mail" without one): none
    return Namespace(prefix, sep)
