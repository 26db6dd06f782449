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
    import sidecar.migration.copier  # noqa: F401 - imported first: sidecar.legacy.imap needs it loaded
    from sidecar.legacy.imap import LegacySource

    marks = store.folder_marks(address)
    out = []
    with LegacySource(params) as src:
        for folder in src.list_folders():
            if not folder.selectable:
                continue
            if changed(src.status(folder.name), marks.get(folder.name)):
                out.append(folder.name)
    return out
