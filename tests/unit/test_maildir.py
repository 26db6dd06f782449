"""The Maildir writer on its own: file names, dovecot-uidlist and dovecot-keywords lines, crash leftovers.

(That Dovecot serves what it writes is shown end to end in test_copier_e2e.py.)
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.migration.copier import maildir
from sidecar.migration.copier.maildir import UIDLIST, MaildirAccount, MaildirError, MaildirFolder
from sidecar.wire.fetchparse import Body

WHEN = dt.datetime(2023, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=2)))
MSG = b"Subject: a\n\nbody\n"


def folder(tmp_path: Path, name: str = "Sent") -> MaildirFolder:
    acc = MaildirAccount(tmp_path / "home")
    acc.ensure()
    f = acc.folder(name).open()
    f.set_header(1234, 1)
    return f


def test_commit_writes_files_uidlist_and_keywords(tmp_path: Path) -> None:
    f = folder(tmp_path)
    f.stage(3, MSG, ["\\Seen", "\\Flagged", "$Label1", "\\Recent"], WHEN, pop3_uidl="UIDL-3")
    f.stage(7, b"x\r\n", ["Zeta", "$Label1", "\\Answered", "\\Draft", "\\Deleted"], None)
    assert list((f.path / "cur").iterdir()) == []  # nothing visible before commit
    f.commit()
    # UID 3's file first: by content, not by name (a name's microsecond field has no fixed width)
    names = sorted(os.listdir(f.path / "cur"), key=lambda n: ",S=3," in n)
    assert len(names) == 2 and names[0].endswith(f",S={len(MSG)},W={len(MSG) + 3}:2,FSa")
    assert names[1].endswith(",S=3,W=3:2,DRTab")
    lines = (f.path / "dovecot-uidlist").read_text().splitlines()
    assert lines[0] == "3 V1234 N8"
    assert lines[1] == "3 PUIDL-3 :" + names[0].split(":")[0]
    assert lines[2] == "7 :" + names[1].split(":")[0]
    assert (f.path / "dovecot-keywords").read_text() == "0 $Label1\n1 Zeta\n"
    assert os.stat(f.path / "cur" / names[0]).st_mtime == WHEN.timestamp()
    assert (f.path / "maildirfolder").exists() and not list((f.path / "tmp").iterdir())
    # read back by a fresh instance
    g = MaildirFolder(f.path).open()
    assert (g.uidvalidity, g.next_uid, sorted(g.records)) == (1234, 8, [3, 7])
    assert g.flags(7) == {"Zeta", "$Label1", "\\Answered", "\\Draft", "\\Deleted"}
    assert g.records[3].pop3_uidl == "UIDL-3"


def test_spooled_body_is_moved_not_copied(tmp_path: Path) -> None:
    f = folder(tmp_path)
    body = Body(100, 10, f.tmp_dir)
    body.write(b"y" * 100)
    body.finish()
    spool = body.path
    assert spool is not None
    f.stage(1, body, [], None)
    f.commit()
    assert not spool.exists()
    assert f.file_path(1).read_bytes() == b"y" * 100


def test_more_than_26_keywords_are_counted_as_lost(tmp_path: Path) -> None:
    f = folder(tmp_path)
    for uid in range(1, 31):
        f.stage(uid, MSG, [f"kw{uid}", "common"], None)
    f.commit()
    assert len(f.keywords) == 26
    assert f.lost_keywords == {f"kw{uid}": 1 for uid in range(26, 31)}
    assert "common" in f.keywords


def test_uids_must_ascend(tmp_path: Path) -> None:
    f = folder(tmp_path)
    f.stage(5, MSG, [], None)
    with pytest.raises(MaildirError):
        f.stage(5, MSG, [], None)
    f.commit()
    with pytest.raises(MaildirError):
        f.stage(2, MSG, [], None)


def test_leftovers_of_an_interrupted_pass_are_removed(tmp_path: Path) -> None:
    f = folder(tmp_path)
    f.stage(1, MSG, [], None)
    f.commit()
    f.stage(2, MSG, [], None)  # staged, never committed
    (f.path / "cur" / "123.orphan,S=1,W=1:2,S").write_bytes(b"x")  # renamed, uidlist not yet written
    g = MaildirFolder(f.path).open()
    assert sorted(g.records) == [1]
    assert os.listdir(g.path / "cur") == [g.records[1].filename]
    assert not list((g.path / "tmp").iterdir())


def test_flags_expunge_and_reset(tmp_path: Path) -> None:
    f = folder(tmp_path)
    for uid in (1, 2, 3):
        f.stage(uid, MSG, ["\\Seen"], None)
    f.commit()
    assert f.set_flags(1, ["\\Flagged", "New"])
    assert not f.set_flags(2, ["\\Seen"])
    f.expunge(3)
    f.commit()
    g = MaildirFolder(f.path).open()
    assert sorted(g.records) == [1, 2] and g.flags(1) == {"\\Flagged", "New"}
    assert g.next_uid == 4  # UIDs are never reused
    g.reset(999, 1)
    g.commit()
    h = MaildirFolder(f.path).open()
    assert (h.uidvalidity, h.records, os.listdir(h.path / "cur")) == (999, {}, [])


def test_subscriptions_file_format(tmp_path: Path) -> None:
    acc = MaildirAccount(tmp_path / "home")
    acc.ensure()
    acc.write_subscriptions(["INBOX", "Ärger/sub", "INBOX"])
    assert (acc.root / "subscriptions").read_text() == "V\t2\n\nINBOX\n&AMQ-rger\tsub\n"
    assert acc.read_subscriptions() == ["INBOX", "Ärger/sub"]


# --- durability order: no message is renamed into cur/ before its data is on disk ------------------------------
def record_syncs(monkeypatch: pytest.MonkeyPatch, f: MaildirFolder, *, syncfs_error: int = 0) -> list[str]:
    """Events in order: 'syncfs', 'fsync' (one file), 'rename <name>' (into cur/)."""
    events: list[str] = []
    real_fsync_close, real_rename = maildir._fsync_close, os.rename

    def fake_syncfs(fd: int) -> None:
        assert os.path.samestat(os.fstat(fd), os.stat(f.path))  # the folder's filesystem
        events.append("syncfs")
        if syncfs_error:
            raise OSError(syncfs_error, "syncfs failed")

    def fsync_close(fd: int) -> None:
        real_fsync_close(fd)
        events.append("fsync")

    def rename(src: Any, dst: Any) -> None:
        real_rename(src, dst)
        if Path(dst).parent.name == "cur":
            events.append(f"rename {Path(dst).name[:1]}")

    monkeypatch.setattr(maildir, "_syncfs", fake_syncfs)
    monkeypatch.setattr(maildir, "_fsync_close", fsync_close)
    monkeypatch.setattr(os, "rename", rename)
    return events


def spooled(f: MaildirFolder, data: bytes) -> Body:
    body = Body(len(data), 10, f.tmp_dir)
    body.write(data)
    body.finish()
    return body


def test_one_syncfs_per_batch_before_the_first_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maildir, "USE_SYNCFS", True)
    f = folder(tmp_path)
    big = spooled(f, b"z" * 100)  # spooled by the parser before the batch began: fsynced on its own
    events = record_syncs(monkeypatch, f)
    for uid in (1, 2, 3):
        f.stage(uid, MSG, [], WHEN)
    f.stage(4, big, [], WHEN)
    assert not list((f.path / "cur").iterdir())
    f.commit()
    renames = [e for e in events if e.startswith("rename")]
    assert events[: -len(renames)] in (["fsync", "syncfs"], ["syncfs", "fsync"])
    assert len(renames) == 4
    f.stage(5, MSG, [], None)  # the next batch: its own syncfs
    f.commit()
    assert events[-2:][0] == "syncfs" and events[-1].startswith("rename")
    g = MaildirFolder(f.path).open()
    assert sorted(g.records) == [1, 2, 3, 4, 5] and g.file_path(4).read_bytes() == b"z" * 100
    assert g.file_path(1).read_bytes() == MSG and os.stat(g.file_path(1)).st_mtime == WHEN.timestamp()


def test_fsync_per_file_without_syncfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maildir, "USE_SYNCFS", False)
    f = folder(tmp_path)
    events = record_syncs(monkeypatch, f)
    for uid in (1, 2, 3):
        f.stage(uid, MSG, [], None)
    f.commit()
    assert events[:3] == ["fsync"] * 3  # every file's fsync finished before the first rename
    assert len(events) == 6 and all(e.startswith("rename") for e in events[3:])


def test_failed_syncfs_makes_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maildir, "USE_SYNCFS", True)
    f = folder(tmp_path)
    f.stage(1, MSG, [], None)
    f.commit()
    events = record_syncs(monkeypatch, f, syncfs_error=5)
    f.stage(2, MSG, [], None)
    with pytest.raises(OSError, match="syncfs failed"):
        f.commit()
    assert events == ["syncfs"]
    f.abort()
    assert len(os.listdir(f.path / "cur")) == 1 and not os.listdir(f.path / "tmp")
    assert sorted(MaildirFolder(f.path).open().records) == [1]


def test_a_background_commit_overlaps_the_next_batch_and_keeps_the_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maildir, "USE_SYNCFS", True)
    f = folder(tmp_path)
    events = record_syncs(monkeypatch, f)
    disk = threading.Event()
    real_syncfs = maildir._syncfs

    def slow_syncfs(fd: int) -> None:  # the disk takes its time: the caller goes on meanwhile
        assert disk.wait(10)
        real_syncfs(fd)

    monkeypatch.setattr(maildir, "_syncfs", slow_syncfs)
    for uid in (1, 2):
        f.stage(uid, MSG, ["\\Seen", "$Work"], WHEN)
    f.commit(background=True)
    f.stage(3, MSG, [], WHEN)  # the next batch arrives while the first waits on the disk
    with pytest.raises(MaildirError, match="UID 2 is not above"):
        f.stage(2, MSG, [], WHEN)  # the batch in flight counts for the UID order
    assert events == [] and f.records == {} and f.last_uid == 0  # nothing durable yet: a mark now names nothing
    assert not os.listdir(f.path / "cur") and not (f.path / UIDLIST).exists()
    disk.set()
    f.commit()  # waits for the first batch, then commits the second
    assert [e.split()[0] for e in events] == ["syncfs", "rename", "rename", "syncfs", "rename"]
    assert sorted(f.records) == [1, 2, 3]
    g = MaildirFolder(f.path).open()
    assert sorted(g.records) == [1, 2, 3] and g.flags(1) == {"\\Seen", "$Work"}
    assert g.file_path(3).read_bytes() == MSG


def test_a_failed_background_commit_is_raised_by_the_next_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maildir, "USE_SYNCFS", True)
    f = folder(tmp_path)
    f.stage(1, MSG, [], None)
    f.commit()
    record_syncs(monkeypatch, f, syncfs_error=5)
    f.stage(2, MSG, [], None)
    f.commit(background=True)
    f.stage(3, MSG, [], None)
    with pytest.raises(OSError, match="syncfs failed"):
        f.commit()
    assert sorted(f.records) == [1]  # the failed batch never joined the records: no mark can name it
    f.abort()
    assert len(os.listdir(f.path / "cur")) == 1 and not os.listdir(f.path / "tmp")
    assert sorted(MaildirFolder(f.path).open().records) == [1]


def test_abort_waits_for_the_batch_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maildir, "USE_SYNCFS", True)
    f = folder(tmp_path)
    started = threading.Event()
    real_syncfs = maildir._syncfs

    def slow_syncfs(fd: int) -> None:
        started.set()
        time.sleep(0.2)
        real_syncfs(fd)

    monkeypatch.setattr(maildir, "_syncfs", slow_syncfs)
    f.stage(1, MSG, [], None)
    f.commit(background=True)
    f.stage(2, MSG, [], None)
    assert started.wait(5)
    f.abort()  # the first batch completes (it was durable before its renames); the second is dropped
    assert sorted(MaildirFolder(f.path).open().records) == [1] and not os.listdir(f.path / "tmp")


@pytest.mark.skipif(not maildir.USE_SYNCFS, reason="no syncfs here")
def test_real_syncfs_commit(tmp_path: Path) -> None:
    f = folder(tmp_path)
    f.stage(1, MSG, ["\\Seen"], WHEN)
    f.commit()
    assert MaildirFolder(f.path).open().file_path(1).read_bytes() == MSG
    assert f._sync_fd is None  # closed after the batch


@pytest.mark.parametrize("syncfs", [True, False])
def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncfs: bool) -> None:
    monkeypatch.setattr(maildir, "USE_SYNCFS", syncfs and maildir.USE_SYNCFS)
    f = folder(tmp_path)
    f.stage(1, MSG, [], None)

    def full(fd: int, owner: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(maildir, "_chown", full)
    with pytest.raises(OSError, match="No space"):
        f.stage(2, MSG, [], None)
    f.abort()
    assert not os.listdir(f.path / "cur") and not os.listdir(f.path / "tmp")  # no partial file anywhere
