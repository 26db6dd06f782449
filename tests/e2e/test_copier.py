"""The copier end to end: the lab's legacy server (both profiles) -> Maildir -> a real target Dovecot.

What is compared is what clients see through IMAP and POP3 on both sides: folder names (after mapping),
subscriptions, UIDVALIDITY, UIDNEXT, and per UID the flags, keywords, INTERNALDATE and the exact bytes; POP3
UIDLs and messages in order. The legacy server and the target are module-scoped (one pair per profile); each
test works on a user of its own, so tests that change the legacy mailbox do not disturb the others.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import imapclient
import pytest
from harness import copier_lab as lab

from sidecar.lab import legacy
from sidecar.lab.legacy import LegacyServer, LegacyUser
from sidecar.migration.copier import (
    CopyOptions,
    CopyResult,
    Progress,
    SourceAuthError,
    SourceParams,
    copy_account,
    target_home,
)
from sidecar.migration.copier.engine import Mode

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("dovecot") is None, reason="needs dovecot")]

SEED = 11


@dataclass
class Env:
    root: Path
    srv: LegacyServer
    target: lab.DovecotInstance

    def user(self, i: int) -> LegacyUser:
        return self.srv.users[i]

    def params(self, u: LegacyUser, **kw: object) -> SourceParams:
        base: dict[str, object] = {
            "host": self.srv.host,
            "user": u.login,
            "password": u.password,
            "imap_port": self.srv.imap,
            "pop3_port": self.srv.pop3,
        }
        base.update(kw)
        return SourceParams(**base)  # type: ignore[arg-type]

    def home(self, u: LegacyUser) -> Path:
        return target_home(self.target.mail_root, u.address)

    def copy(
        self,
        u: LegacyUser,
        store: lab.FakeStore,
        mode: Mode = "initial",
        *,
        progress: Callable[[Progress], None] | None = None,
        options: CopyOptions | None = None,
    ) -> CopyResult:
        return copy_account(
            self.params(u), self.home(u), store, u.address, mode=mode, progress=progress, options=options
        )

    def legacy_name(self, target: str) -> str:
        """The legacy name of a target folder name ("Archive/2023" -> "INBOX.Archive.2023" courier-style)."""
        return "INBOX" if target == "INBOX" else self.srv.folder_name(tuple(target.split("/")))

    def target_name(self, legacy_name: str) -> str:
        if legacy_name == "INBOX":
            return "INBOX"
        return legacy_name.removeprefix(self.srv.ns_prefix).replace(self.srv.ns_sep, "/")

    def legacy_client(self, u: LegacyUser) -> imapclient.IMAPClient:
        c = imapclient.IMAPClient(self.srv.host, port=self.srv.imap, ssl=False, timeout=15)
        c.login(u.login, u.password)
        return c

    def target_client(self, u: LegacyUser) -> imapclient.IMAPClient:
        c = imapclient.IMAPClient(self.target.host, port=self.target.imap, ssl=False, timeout=15)
        c.login(u.address, u.password)
        return c

    def assert_equal(self, u: LegacyUser) -> None:
        """Everything a client sees is equal on both servers (folder names mapped)."""
        ns = (self.srv.ns_prefix, self.srv.ns_sep)
        lab.assert_migrated(self.srv, self.target, u.login, u.address, u.password, ns)


@pytest.fixture(scope="module", params=legacy.PROFILES)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    root = lab.lab_dir()
    try:
        srv = legacy.start_legacy(root / "lab", host=lab.private_host(), profile=request.param, users=8, seed=SEED)
        try:
            target = lab.start_target(root / "target", srv.host, users_file=srv.dir / "users")
            try:
                yield Env(root, srv, target)
            finally:
                target.stop()
        finally:
            legacy.stop_legacy(root / "lab")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_initial_copy_is_what_clients_saw(env: Env) -> None:
    u = env.user(0)
    store = lab.FakeStore()
    result = env.copy(u, store)
    env.assert_equal(u)
    plan = env.srv.plan(u)
    assert result.messages_copied == plan.count
    inbox = plan.expected_counts()[()]
    assert result.pop3_matched == inbox and result.pop3_unmatched == []
    # every legacy folder, special ones by their special-use name
    assert {f.target for f in result.folders} == {"/".join(f.parts) or "INBOX" for f in plan.folders}
    # ownership and modes: vmail, 0700 directories, 0600 files
    vmail = lab._vmail()
    for dirpath, dirnames, filenames in os.walk(env.home(u)):
        for d in dirnames:
            st = os.stat(Path(dirpath) / d)
            assert (st.st_uid, st.st_gid) == vmail and st.st_mode & 0o777 == 0o700
        for f in filenames:
            st = os.stat(Path(dirpath) / f)
            if f.startswith("dovecot.") or f.startswith("dovecot-uidvalidity"):
                continue  # written by the target Dovecot while we read back
            assert (st.st_uid, st.st_gid) == vmail and st.st_mode & 0o777 == 0o600, f
    # a watermark for every folder, at its last UID
    written = {m.folder: m.last_uid for m in store.marks[u.address].values()}
    for f in plan.folders:
        with env.legacy_client(u) as c:
            c.select_folder(env.legacy_name("/".join(f.parts) or "INBOX"), readonly=True)
            uids = c.search("ALL")
        assert written[env.legacy_name("/".join(f.parts) or "INBOX")] == max(uids, default=0)


def test_interrupted_copy_resumes_without_duplicates_or_holes(env: Env) -> None:
    u = env.user(1)
    store = lab.FakeStore()
    seen: list[Progress] = []

    class Boom(Exception):
        pass

    def stop_after_five(p: Progress) -> None:
        seen.append(p)
        if len(seen) == 5:
            raise Boom

    with pytest.raises(Boom):
        env.copy(u, store, progress=stop_after_five, options=CopyOptions(batch_messages=3))
    inbox_mark = store.marks[u.address]["INBOX"]
    assert 0 < inbox_mark.messages == 3  # one batch committed before the interrupt
    second: list[Progress] = []
    result = env.copy(u, store, progress=second.append, options=CopyOptions(batch_messages=3))
    env.assert_equal(u)
    assert result.messages_copied == env.srv.plan(u).count - 3
    assert second[-1].messages_done == result.messages_copied
    assert not [p for p in (env.home(u) / "Maildir" / "tmp").iterdir()]


def test_delta_brings_target_equal_after_legacy_changes(env: Env) -> None:
    u = env.user(2)
    store = lab.FakeStore()
    env.copy(u, store)
    env.assert_equal(u)  # the target Dovecot has now indexed the mailbox we wrote
    with env.legacy_client(u) as c:
        c.append("INBOX", lab.message(50), ["$New"], dt.datetime(2024, 2, 2, 2, 2, 2, tzinfo=dt.UTC))
        c.select_folder("INBOX")
        uids = c.search("ALL")
        c.add_flags([uids[1]], ["\\Flagged", "Wichtig"])
        c.remove_flags([uids[0]], ["todo", "\\Seen"])
        c.delete_messages([uids[2]])
        c.expunge()
        c.delete_folder(env.legacy_name("Archive/2023"))
        c.create_folder(env.legacy_name("Neu"))
        c.append(env.legacy_name("Neu"), lab.message(60), ["\\Seen"], dt.datetime(2024, 3, 3, tzinfo=dt.UTC))
        c.subscribe_folder(env.legacy_name("Neu"))
    result = env.copy(u, store, mode="delta")
    env.assert_equal(u)
    assert result.removed_folders == ["Archive/2023"]
    inbox = result.folders[0]
    assert (inbox.copied, inbox.expunged, inbox.flags_updated) == (1, 1, 2)
    # a second delta with no change copies nothing
    again = env.copy(u, store, mode="delta")
    assert again.messages_copied == 0 and all(f.flags_updated == 0 for f in again.folders)
    env.assert_equal(u)


def test_changed_uidvalidity_recopies_that_folder(env: Env) -> None:
    u = env.user(3)
    store = lab.FakeStore()
    env.copy(u, store)
    folder = env.legacy_name("Trash")
    with env.legacy_client(u) as c:
        before = c.folder_status(folder, ["UIDVALIDITY"])[b"UIDVALIDITY"]
        c.rename_folder(folder, env.legacy_name("Alt"))
        c.create_folder(folder)
        c.append(folder, lab.message(70), [], dt.datetime(2024, 4, 4, tzinfo=dt.UTC))
        after = c.folder_status(folder, ["UIDVALIDITY"])[b"UIDVALIDITY"]
    assert before != after
    result = env.copy(u, store, mode="delta")
    env.assert_equal(u)
    assert [f.target for f in result.folders if f.recopied] == ["Trash"]


@pytest.mark.parametrize(("user", "mode"), [(4, "master"), (5, "authzid")])
def test_admin_login_copies_the_user(env: Env, user: int, mode: str) -> None:
    u = env.user(user)
    params = env.params(u, password="", admin_user=env.srv.admin_user, admin_password=env.srv.admin_password)
    params = SourceParams(**{**params.__dict__, "admin_mode": mode})
    copy_account(params, env.home(u), lab.FakeStore(), u.address)
    env.assert_equal(u)


def test_wrong_password_is_an_auth_error_without_the_password() -> None:
    # a minimal legacy Dovecot of its own: the lab server's auth penalty would slow the other tests' logins
    root = lab.lab_dir()
    inst = lab.start_legacy(root / "legacy", "user@example.org")
    try:
        params = SourceParams(host=inst.host, user="user@example.org", password="Wrong-secret-9", imap_port=inst.imap)
        home = root / "home"
        with pytest.raises(SourceAuthError) as info:
            copy_account(params, home, lab.FakeStore(), "user@example.org")
        assert "Wrong-secret-9" not in str(info.value) and "Wrong-secret-9" not in repr(params)
        assert not home.exists()
    finally:
        lab.cleanup(inst)
        shutil.rmtree(root, ignore_errors=True)


def test_legacy_pop3_order_is_kept(env: Env) -> None:
    """courier-style numbers POP3 messages in an order of its own (not the UID order): the target lists them in
    that order too (dovecot-uidlist O fields); with Dovecot's own order no O field is written."""
    u = env.user(6)
    result = env.copy(u, lab.FakeStore())
    assert result.pop3_unmatched == []
    env.assert_equal(u)  # POP3: the same UIDLs and messages, in the same order
    uidlist = (env.home(u) / "Maildir" / "dovecot-uidlist").read_text().splitlines()[1:]
    orders = [f for line in uidlist for f in line.split(" :")[0].split() if f.startswith("O")]
    if env.srv.profile == "courier-style":
        assert len(orders) == len(uidlist) and orders != [f"O{n}" for n in range(1, len(uidlist) + 1)]
    else:
        assert orders == []


def test_several_sessions_copy_folders_in_parallel_only_where_the_cap_has_room(env: Env) -> None:
    """limits.copy_connections: the folders spread over several legacy sessions give the same mailbox as one
    session; the extra sessions open only while the node's legacy cap has room; a failure in any session stops
    the pass, every session is closed, and the next pass resumes without duplicates or holes."""
    from sidecar.legacy.limit import LegacyLimiter

    u = env.user(7)
    store = lab.FakeStore()
    total = env.srv.plan(u).count
    seen: list[int] = []

    class Boom(Exception):
        pass

    def stop_after(n: int) -> Callable[[Progress], None]:
        def progress(p: Progress) -> None:
            seen.append(p.messages_done)
            if len(seen) == n:
                raise Boom

        return progress

    def copy(limiter: LegacyLimiter, **kw: object) -> CopyResult:
        return copy_account(
            env.params(u, limiter=limiter), env.home(u), store, u.address,
            options=CopyOptions(connections=3, batch_messages=4), **kw,  # type: ignore[arg-type]
        )  # fmt: skip

    # a cap that leaves one connection for copies (the other is kept for password checks): one session only
    full = LegacyLimiter(2, 1)
    with pytest.raises(Boom):
        copy(full, progress=stop_after(6))
    assert full.peak == 1 and full.in_use() == {k: 0 for k in full.in_use()}
    # room for three: three sessions; one of them fails; all closed, what was committed stays
    roomy = LegacyLimiter(8, 4)
    seen.clear()
    with pytest.raises(Boom):
        copy(roomy, progress=stop_after(25))
    assert roomy.peak == 3 and sum(roomy.in_use().values()) == 0
    committed = sum(m.messages for m in store.marks[u.address].values())
    assert 4 <= committed < total
    # the next pass over three sessions resumes: the target is what clients saw, nothing twice
    roomy.peak = 0
    result = copy(roomy)
    assert roomy.peak == 3
    assert result.messages_copied == total - committed
    env.assert_equal(u)
    for folder in [env.home(u) / "Maildir", *(env.home(u) / "Maildir").glob(".*")]:
        if (folder / "tmp").is_dir():
            assert not list((folder / "tmp").iterdir()), folder
