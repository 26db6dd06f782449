"""The trailing sweep's cheap first look: has anything arrived in a migrated account's legacy mailbox?

A sweep runs every `limits.sweep_interval` for every migrated account until finalize, so with thousands of
accounts its common case (nothing new) must cost little on both sides. changed_folders() logs in, LISTs and
asks STATUS (MESSAGES UIDNEXT UIDVALIDITY) per folder, and compares with the copier's watermarks in the store
(folder_marks): no SELECT, no FETCH, nothing read on the target. Only when a folder changed does the job
runner run the append pass (sidecar.migration.copier, mode "append"), which raises the watermark to UIDNEXT-1
afterwards, so a folder whose newest legacy messages were expunged is not swept in full every time.

Measured in bench/sweep_cost.py (results in bench/results/sweep_cost.md).
"""

from __future__ import annotations

import contextlib
from typing import Any

from sidecar.store.base import FolderMark, Store


def changed(status: Any, mark: FolderMark | None) -> bool:
    """Whether a legacy folder (its STATUS) holds mail the target does not have per the watermark."""
    if mark is None:
        return bool(status.exists)  # a folder that appeared after the copy: only worth a pass with mail in it
    if mark.uidvalidity != status.uidvalidity:
        return True
    if status.uidnext:
        return bool(status.uidnext > mark.last_uid + 1)
    return bool(status.exists)  # no UIDNEXT from this server: look whenever the folder is not empty


def changed_folders(params: Any, store: Store, address: str) -> list[str]:
    """Legacy folders with mail above their watermark (an empty list: nothing to sweep)."""
    from sidecar.legacy.imap import LegacySource

    marks = store.folder_marks(address)
    with LegacySource(params) as src:
        statuses = folder_statuses(src)
    return [name for name, status in statuses.items() if changed(status, marks.get(name))]


def folder_statuses(src: Any) -> dict[str, Any]:
    """STATUS (MESSAGES UIDNEXT UIDVALIDITY) of every selectable folder: one LIST ... RETURN (STATUS ...)
    round trip where the server has LIST-STATUS (RFC 5819; Dovecot, Cyrus), else LIST then one STATUS each."""
    if "LIST-STATUS" in src.capabilities:
        with contextlib.suppress(SourceProtocolError):
            return _list_status(src)
    return {f.name: src.status(f.name) for f in src.list_folders() if f.selectable}


class SourceProtocolError(Exception):
    """The LIST-STATUS answer did not parse: fall back to LIST and STATUS."""


def _list_status(src: Any) -> dict[str, Any]:
    from imapclient.imap_utf7 import decode
    from imapclient.response_parser import parse_response

    from sidecar.legacy.folder import LegacyFolder
    from sidecar.legacy.imap import FolderStatus

    c = src._c()
    imap = c._imap
    typ, data = src._call("LIST-STATUS", imap._simple_command, "LIST", '""', '"*"', "RETURN",
                          "(STATUS (MESSAGES UIDNEXT UIDVALIDITY))")  # fmt: skip
    if typ != "OK":
        raise SourceProtocolError(f"LIST RETURN (STATUS): {typ}")
    statuses = imap.untagged_responses.pop("STATUS", [])
    _typ, listed = imap._untagged_response(typ, data, "LIST")
    selectable = {_name(f) for f in c._proc_folder_list(listed) if LegacyFolder(_name(f), None, _flags(f)).selectable}
    out: dict[str, Any] = {}
    try:
        items = _join_literals(statuses)
        for item in items:
            raw_name, values = parse_response(item)
            name = decode(raw_name) if isinstance(raw_name, bytes) else str(raw_name)
            v = dict(zip(values[::2], values[1::2], strict=True))
            if name in selectable:
                out[name] = FolderStatus(int(v.get(b"UIDVALIDITY", 0)), int(v.get(b"UIDNEXT", 0)),
                                         int(v.get(b"MESSAGES", 0)))  # fmt: skip
    except (ValueError, TypeError, KeyError) as e:
        raise SourceProtocolError(str(e)) from None
    if set(out) != selectable:  # a folder without its STATUS (the server left it out): ask the slow way
        raise SourceProtocolError("LIST-STATUS left folders out")
    return out


def _name(folder: tuple[Any, Any, Any]) -> str:
    name = folder[2]
    return name.decode() if isinstance(name, bytes) else str(name)


def _flags(folder: tuple[Any, Any, Any]) -> tuple[str, ...]:
    return tuple(f.decode() if isinstance(f, bytes) else str(f) for f in folder[0])


def _join_literals(data: list[Any]) -> list[list[Any]]:
    """imaplib's untagged STATUS data (a literal folder name arrives as a (header, literal) tuple followed by
    the rest of the line) as parse_response input, one list per response."""
    out: list[list[Any]] = []
    pending: list[Any] = []
    for piece in data:
        if isinstance(piece, tuple):
            pending = [piece]
            continue
        if piece is None:
            continue
        out.append([*pending, piece])
        pending = []
    return out
