"""The copier end to end: a real legacy Dovecot (two namespace profiles) -> Maildir -> a real target Dovecot.

What is compared is what clients see through IMAP and POP3 on both sides: folder names, subscriptions,
UIDVALIDITY, UIDNEXT, and per UID the flags, keywords, INTERNALDATE and the exact bytes; POP3 UIDLs in order.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import copier_lab as lab
import imapclient
import pytest

from sidecar.copier import (
    CopyOptions,
    CopyResult,
    Progress,
    SourceAuthError,
    SourceParams,
    copy_account,
    target_home,
)

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("dovecot") is None, reason="needs dovecot")]

ADDR = "user@example.org"
# legacy name (without namespace prefix) -> target name
EXPECTED = {
    "INBOX": "INBOX",
    "Sent Items": "Sent",  # special-use \Sent on the legacy side
    "Spam": "Junk",  # localized name
    "Projekte": "Projekte",
    "Projekte/Ärger & Co": "Projekte/Ärger & Co",
}
AUTO_SUBSCRIBED = {"Drafts", "Sent", "Trash", "Junk", "Archive"}


class Lab:
    def __init__(self, profile: str) -> None:
        root = self.root = lab.lab_dir()
        self.profile = profile
        self.legacy = lab.start_legacy(root / "legacy", ADDR, profile)
        try:
            self.target = lab.start_target(root / "target")
        except Exception:
            self.legacy.stop()
            shutil.rmtree(root, ignore_errors=True)
            raise
        self.store = lab.FakeStore()
        self.home = target_home(self.target.mail_root, ADDR)

    def legacy_name(self, plain: str) -> str:
        if plain == "INBOX" or self.profile == "dovecot":
            return plain
        return "INBOX." + plain.replace("/", ".")

    def params(self, **kw: object) -> SourceParams:
        base: dict[str, object] = {
            "host": self.legacy.host,
            "user": ADDR,
            "password": lab.PASSWORD,
            "imap_port": self.legacy.imap,
            "pop3_port": self.legacy.pop3,
        }
        base.update(kw)
        return SourceParams(**base)  # type: ignore[arg-type]

    def copy(
        self,
        mode: Literal["initial", "delta"] = "initial",
        *,
        progress: Callable[[Progress], None] | None = None,
        options: CopyOptions | None = None,
    ) -> CopyResult:
        return copy_account(
            self.params(), self.home, self.store, ADDR, mode=mode, progress=progress, options=options
        )

    def legacy_client(self) -> imapclient.IMAPClient:
        c = imapclient.IMAPClient(self.legacy.host, port=self.legacy.imap, ssl=False, timeout=15)
        c.login(ADDR, lab.PASSWORD)
        return c

    def assert_equal(self, expected_names: dict[str, str] | None = None) -> None:
        names = {self.legacy_name(k): v for k, v in (expected_names or EXPECTED).items()}
        old = lab.snapshot(self.legacy, ADDR)
        new = lab.snapshot(self.target, ADDR)
        assert set(old.folders) == set(names)
        for legacy, target in names.items():
            a, b = old.folders[legacy], new.folders[target]
            assert b["uidvalidity"] == a["uidvalidity"], legacy
            assert b["uidnext"] == a["uidnext"], legacy
            assert sorted(b["messages"]) == sorted(a["messages"]), legacy
            for uid, (flags, date, body) in a["messages"].items():
                assert b["messages"][uid] == (flags, date, body), (legacy, uid)
        # folders on the target beyond the mapped ones are only Dovecot's auto-created special folders, empty
        for extra in set(new.folders) - set(names.values()):
            assert extra in AUTO_SUBSCRIBED and not new.folders[extra]["messages"]

        # subscriptions of folders that no longer exist are kept too (as on the legacy server)
        def target_of(n: str) -> str:
            if n in names:
                return names[n]
            return n.removeprefix("INBOX.").replace(".", "/") if self.profile != "dovecot" else n

        assert new.subscribed - AUTO_SUBSCRIBED == {target_of(n) for n in old.subscribed} - AUTO_SUBSCRIBED
        assert [u for u, _ in new.pop3] == [u for u, _ in old.pop3]
        assert new.pop3 == old.pop3

    def stop(self) -> None:
        self.legacy.stop()
        self.target.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(params=["dovecot", "courier-style"])
def env(request: pytest.FixtureRequest) -> Iterator[Lab]:
    e = Lab(request.param)
    try:
        lab.populate(e.legacy, ADDR, request.param, big=3_000_000)
        yield e
    finally:
        e.stop()


def test_initial_copy_is_what_clients_saw(env: Lab) -> None:
    result = env.copy()
    env.assert_equal()
    assert result.messages_copied == 10 + 3 + 4 + 5 + 6
    assert result.pop3_matched == 10 and result.pop3_unmatched == []
    # ownership and modes: vmail, 0700 directories, 0600 files
    vmail = lab._vmail()
    for dirpath, dirnames, filenames in os.walk(env.home):
        for d in dirnames:
            st = os.stat(Path(dirpath) / d)
            assert (st.st_uid, st.st_gid) == vmail and st.st_mode & 0o777 == 0o700
        for f in filenames:
            st = os.stat(Path(dirpath) / f)
            if f.startswith("dovecot.") or f.startswith("dovecot-uidvalidity"):
                continue  # written by the target Dovecot while we read back
            assert (st.st_uid, st.st_gid) == vmail and st.st_mode & 0o777 == 0o600, f
    # marks recorded for every folder, at the last UID
    marks = env.store.marks[ADDR]
    assert marks[env.legacy_name("INBOX")].last_uid == 12
    assert marks[env.legacy_name("Spam")].last_uid == 6


def test_interrupted_copy_resumes_without_duplicates_or_holes(env: Lab) -> None:
    seen: list[Progress] = []

    class Boom(Exception):
        pass

    def stop_after_five(p: Progress) -> None:
        seen.append(p)
        if len(seen) == 5:
            raise Boom

    with pytest.raises(Boom):
        env.copy(progress=stop_after_five, options=CopyOptions(batch_messages=3))
    inbox_mark = env.store.marks[ADDR][env.legacy_name("INBOX")]
    assert 0 < inbox_mark.last_uid < 12  # partly copied, watermark below the end
    second: list[Progress] = []
    result = env.copy(progress=second.append, options=CopyOptions(batch_messages=3))
    env.assert_equal()
    assert result.messages_copied == 28 - 3  # 3 committed before the interrupt
    assert second[-1].messages_done == result.messages_copied
    assert not list((env.home / "Maildir" / "tmp").iterdir())


def test_delta_brings_target_equal_after_legacy_changes(env: Lab) -> None:
    env.copy()
    env.assert_equal()  # the target Dovecot has now indexed the mailbox we wrote
    with env.legacy_client() as c:
        c.append("INBOX", lab.message(50), ["$New"], dt.datetime(2024, 2, 2, 2, 2, 2, tzinfo=dt.UTC))
        c.select_folder("INBOX")
        c.add_flags([1], ["\\Flagged", "Wichtig"])
        c.remove_flags([4], ["$Label1", "\\Seen"])
        c.delete_messages([2])
        c.expunge()
        c.delete_folder(env.legacy_name("Projekte/Ärger & Co"))
        c.create_folder(env.legacy_name("Neu"))
        c.append(env.legacy_name("Neu"), lab.message(60), ["\\Seen"], dt.datetime(2024, 3, 3, tzinfo=dt.UTC))
        c.subscribe_folder(env.legacy_name("Neu"))
    result = env.copy(mode="delta")
    names = dict(EXPECTED)
    del names["Projekte/Ärger & Co"]
    names["Neu"] = "Neu"
    env.assert_equal(names)
    assert result.removed_folders == ["Projekte/Ärger & Co"]
    inbox = result.folders[0]
    assert (inbox.copied, inbox.expunged, inbox.flags_updated) == (1, 1, 2)
    # a second delta with no change copies nothing
    again = env.copy(mode="delta")
    assert again.messages_copied == 0 and all(f.flags_updated == 0 for f in again.folders)
    env.assert_equal(names)


def test_changed_uidvalidity_recopies_that_folder(env: Lab) -> None:
    env.copy()
    folder = env.legacy_name("Projekte")
    with env.legacy_client() as c:
        before = c.folder_status(folder, ["UIDVALIDITY"])[b"UIDVALIDITY"]
        c.rename_folder(folder, env.legacy_name("Alt"))
        c.create_folder(folder)
        c.append(folder, lab.message(70), [], dt.datetime(2024, 4, 4, tzinfo=dt.UTC))
        after = c.folder_status(folder, ["UIDVALIDITY"])[b"UIDVALIDITY"]
    assert before != after
    result = env.copy(mode="delta")
    names = dict(EXPECTED)
    names["Alt"] = "Alt"
    names["Alt/Ärger & Co"] = "Alt/Ärger & Co"
    del names["Projekte/Ärger & Co"]
    env.assert_equal(names)
    recopied = [f for f in result.folders if f.recopied]
    assert [f.target for f in recopied] == ["Projekte"]


@pytest.mark.parametrize("mode", ["master", "authzid"])
def test_admin_login_copies_the_user(mode: str) -> None:
    e = Lab("dovecot")
    try:
        lab.populate(e.legacy, ADDR, "dovecot")
        params = e.params(
            password="", admin_user=lab.MASTER, admin_password=lab.MASTER_PASSWORD, admin_mode=mode
        )
        copy_account(params, e.home, e.store, ADDR)
        e.assert_equal()
    finally:
        e.stop()


def test_wrong_password_is_an_auth_error_without_the_password() -> None:
    e = Lab("dovecot")
    try:
        with pytest.raises(SourceAuthError) as info:
            copy_account(e.params(password="Wrong-secret-9"), e.home, e.store, ADDR)
        assert "Wrong-secret-9" not in str(info.value) and "Wrong-secret-9" not in repr(e.params())
        assert not e.home.exists()
    finally:
        e.stop()
