"""The copier: one account from the legacy server (IMAP, POP3 UIDLs and order; or POP3 alone) into the target
Dovecot's Maildir.

Public API for the job runner:
    copy_account(source_params, target_home, store, address, *, mode="initial"|"delta", progress=callback,
                 options=CopyOptions(...)) -> CopyResult
    SourceParams.from_config(cfg.legacy, user, password, use_admin=False)
    target_home(mail_root, address) -> Path           (MAIL_ROOT/DOMAIN/LOCALPART, Dovecot's mail_home)
Errors: SourceAuthError (credentials refused), SourceUnavailable (temporary; SourceProtocolError: a malformed
response; SourceBusy: this node's legacy connections are all taken), SourceError, MaildirError (MaildirLocked:
Dovecot holds the uidlist lock, temporary).
"""

from __future__ import annotations

from pathlib import Path

from sidecar.legacy.imap import (
    SourceAuthError,
    SourceBusy,
    SourceError,
    SourceParams,
    SourceProtocolError,
    SourceUnavailable,
)
from sidecar.migration.copier.engine import CopyOptions, CopyResult, FolderResult, Progress, copy_account
from sidecar.migration.copier.folders import LAYOUT, TargetLayout
from sidecar.migration.copier.maildir import MaildirError


def target_home(mail_root: str | Path, address: str) -> Path:
    """The home of an account on the target (`mail_home = MAIL_ROOT/%d/%n`)."""
    local, _, domain = address.rpartition("@")
    if not local or not domain or "/" in address or "\0" in address or ".." in address or address.startswith("."):
        raise ValueError(f"not a mail address: {address!r}")
    if domain.startswith("."):  # "x@." would name MAIL_ROOT/x: a domain directory, not a mailbox
        raise ValueError(f"not a mail address: {address!r}")
    return Path(mail_root) / domain / local


__all__ = [
    "LAYOUT",
    "CopyOptions",
    "CopyResult",
    "FolderResult",
    "MaildirError",
    "Progress",
    "SourceAuthError",
    "SourceBusy",
    "SourceError",
    "SourceParams",
    "SourceProtocolError",
    "SourceUnavailable",
    "TargetLayout",
    "copy_account",
    "target_home",
]
