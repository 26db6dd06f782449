"""POP3 order in dovecot-uidlist (`O<n>`): written only where the legacy POP3 order is not the UID order,
read back, and kept through rewrites. (That Dovecot lists POP3 messages by it is shown end to end in
tests/e2e/test_copier.py with the courier-style legacy profile.)"""

from __future__ import annotations

from pathlib import Path

from sidecar.migration.copier.maildir import MaildirAccount, MaildirFolder
from sidecar.migration.copier.pop3copy import _date, pop3_order


def _inbox(tmp_path: Path) -> MaildirFolder:
    acc = MaildirAccount(tmp_path / "home")
    acc.ensure()
    f = acc.folder("INBOX").open()
    f.set_header(77, 1)
    for uid in (1, 2, 3, 5):
        f.stage(uid, b"Subject: %d\r\n\r\nx\r\n" % uid, (), None, pop3_uidl=f"u{uid}")
    f.commit()
    return f


def test_same_order_writes_no_order(tmp_path: Path) -> None:
    f = _inbox(tmp_path)
    assert pop3_order(f, ["u1", "u2", "u3", "u5"]) == 0
    f.commit()
    assert " O" not in (f.path / "dovecot-uidlist").read_text()


def test_other_order_is_written_and_read_back(tmp_path: Path) -> None:
    f = _inbox(tmp_path)
    assert pop3_order(f, ["u3", "u1", "gone", "u5", "u2"]) == 4
    f.commit()
    lines = (f.path / "dovecot-uidlist").read_text().splitlines()[1:]
    assert [line.split(" :")[0] for line in lines] == ["1 Pu1 O2", "2 Pu2 O4", "3 Pu3 O1", "5 Pu5 O3"]
    again = MaildirFolder(f.path, is_inbox=True).open()
    assert {uid: r.pop3_order for uid, r in again.records.items()} == {1: 2, 2: 4, 3: 1, 5: 3}
    assert all(r.ext == () for r in again.records.values())
    # back in UID order: the orders go
    assert pop3_order(again, ["u1", "u2", "u3", "u5"]) == 0
    again.commit()
    assert " O" not in (f.path / "dovecot-uidlist").read_text()


def test_date_header_gives_the_file_date() -> None:
    when = _date(b"Subject: x\r\nDate: Mon, 1 Jan 2024 10:00:00 +0200\r\n\r\nbody\r\nDate: no\r\n")
    assert when is not None and when.isoformat() == "2024-01-01T10:00:00+02:00"
    assert _date(b"Subject: x\r\n\r\nDate: Mon, 1 Jan 2024 10:00:00 +0200\r\n") is None
    assert _date(b"Date: garbage\r\n\r\n") is None
