"""INBOX over POP3, for legacy servers without IMAP (legacy.imap_port = 0): the job runner's copy path then.

More (the reasons and limits behind this module): docs/modules.md, sidecar/migration/copier/pop3copy.py.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import itertools
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.legacy.imap import SourceParams
from sidecar.legacy.pop3 import LegacyPop3, Pop3Message
from sidecar.migration.copier.maildir import MaildirAccount, MaildirFolder, write_file_atomic
from sidecar.store.base import FolderMark

if TYPE_CHECKING:
    from sidecar.migration.copier.engine import CopyOptions, CopyStore, FolderResult, Mode

log = logging.getLogger("autoport.copier")

SEEN_FILE = ".autoport-pop3-uidls"  # in the account's home, beside Maildir/
_DATE = re.compile(rb"^date:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def _date(message: bytes) -> dt.datetime | None:
    end = message.find(b"\r\n\r\n")
    m = _DATE.search(message[: end if end >= 0 else 1 << 16])
    if not m:
        return None
    try:
        when = email.utils.parsedate_to_datetime(" ".join(m.group(1).decode("ascii", "replace").split()))
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when


def _read_seen(home: Path) -> set[str]:
    try:
        return set((home / SEEN_FILE).read_text("utf-8", "surrogateescape").split())
    except FileNotFoundError:
        return set()


def _write_seen(home: Path, uidls: set[str], owner: tuple[int, int] | None) -> None:
    data = "".join(u + "\n" for u in sorted(uidls)).encode("utf-8", "surrogateescape")
    write_file_atomic(home / SEEN_FILE, data, owner)


def pop3_order(folder: MaildirFolder, listing: list[str]) -> int:
    """Give the folder's messages the POP3 order of `listing` (UIDLs in legacy order) where UID order differs;
    returns how many messages carry an order. Messages not in the listing keep none (listed after)."""
    by_uidl = {r.pop3_uidl: uid for uid, r in folder.records.items() if r.pop3_uidl}
    uids = [by_uidl[u] for u in listing if u in by_uidl]
    in_order = all(a < b for a, b in itertools.pairwise(uids))
    orders = {} if in_order else {uid: n for n, uid in enumerate(uids, 1)}
    for uid in folder.records:
        folder.set_pop3_order(uid, orders.get(uid))
    return len(orders)


def copy_pop3(
    params: SourceParams,
    account: MaildirAccount,
    store: CopyStore,
    address: str,
    mode: Mode,
    opts: CopyOptions,
    progress: Callable[[str, int, int, int], None],
) -> FolderResult:
    """The INBOX of `address` over POP3 into the target (module doc); the folder's result."""
    from sidecar.migration.copier.engine import FolderResult

    home = account.home
    with LegacyPop3(params) as pop:
        listing = pop.messages()
        store.set_progress(address, total=len(listing))
        if mode == "append":
            return _append(pop, listing, account, store, address, opts, progress)
        folder = account.folder("INBOX").open()
        mark = store.folder_marks(address).get("INBOX")
        uidvalidity = folder.uidvalidity or (mark.uidvalidity if mark else 0) or int(time.time())
        folder.set_header(uidvalidity, folder.next_uid)
        fres = FolderResult("INBOX", "INBOX", uidvalidity)
        legacy_uidls = {m.uidl for m in listing}
        have = {r.pop3_uidl: uid for uid, r in folder.records.items() if r.pop3_uidl}
        for uidl, uid in have.items():
            if uidl not in legacy_uidls:
                folder.expunge(uid)
                fres.expunged += 1
        folder.commit()
        seen = _read_seen(home)
        uid = max(folder.next_uid, folder.last_uid + 1)
        try:
            for m in listing:
                if m.uidl in have:
                    continue
                body = pop.retr(m.number)
                size = folder.stage(uid, body, (), _date(body), pop3_uidl=m.uidl)
                uid += 1
                seen.add(m.uidl)
                fres.copied += 1
                fres.bytes += size
                progress("INBOX", 1, size, len(listing))
                if folder.pending >= opts.batch_messages:
                    _commit(folder, store, address, seen, account)
            pop3_order(folder, [m.uidl for m in listing])
            _commit(folder, store, address, seen, account)
        except BaseException:
            folder.abort()
            raise
    fres.messages = len(folder.records)
    return fres


def _commit(folder: MaildirFolder, store: CopyStore, address: str, seen: set[str], account: MaildirAccount) -> None:
    folder.commit()
    _write_seen(account.home, seen, account.owner)
    store.set_folder_mark(address, FolderMark("INBOX", folder.uidvalidity, folder.last_uid, len(folder.records)))


def _append(
    pop: LegacyPop3,
    listing: list[Pop3Message],
    account: MaildirAccount,
    store: CopyStore,
    address: str,
    opts: CopyOptions,
    progress: Callable[[str, int, int, int], None],
) -> FolderResult:
    from sidecar.migration.copier.engine import FolderResult

    folder = account.folder("INBOX").open_shared()
    seen = _read_seen(account.home) | {r.pop3_uidl for r in folder.records.values() if r.pop3_uidl}
    fres = FolderResult("INBOX", "INBOX", folder.uidvalidity)
    try:
        for m in listing:
            if m.uidl in seen:
                continue
            body = pop.retr(m.number)
            size = folder.stage_append(body, (), _date(body), (0, 0), pop3_uidl=m.uidl)
            seen.add(m.uidl)
            fres.copied += 1
            fres.bytes += size
            progress("INBOX", 1, size, len(listing))
        fres.appended_uids += folder.commit_append(folder.uidvalidity, opts.lock_timeout)
        _write_seen(account.home, seen, account.owner)
    except BaseException:
        folder.abort()
        raise
    fres.messages = len(folder.records)
    return fres
