"""The one fake store: in memory, for unit tests of pure logic (routing, socketmap, auth policy, milter, copier).

It implements the parts of the Store interface those use; the real backends have their own tests
(tests/unit/test_store.py, on SQLite and PostgreSQL). Pass it where a Store is expected with cast(Store, fake).
Knobs: `down` (every call raises StoreUnavailable), `fail` (log_messages raises), `block` (state_of and
log_messages wait on the event first, up to 10 s).
"""

from __future__ import annotations

import threading
from typing import Any

from sidecar.states import State, check_transition
from sidecar.store.base import Conflict, FolderMark, ImportedUser, MessageRecord, StoreUnavailable, UnknownAccount


class FakeStore:
    def __init__(
        self,
        states: dict[str, State] | None = None,
        *,
        down: bool = False,
        fail: bool = False,
        block: threading.Event | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self.states: dict[str, State] = states if states is not None else {}
        self.down = down
        self.fail = fail
        self.block = block
        self.asked: list[str] = []  # state_of lookups, in order
        self.hashes: dict[str, str] = {}
        self.logins: dict[str, set[str]] = {}
        self.jobs: dict[str, int] = {}
        self.transitions: list[tuple[str, State | None, State]] = []
        self.rows: list[MessageRecord] = []  # log_messages
        self.calls = 0  # log_messages calls
        self.marks: dict[str, dict[str, FolderMark]] = {}
        self.progress: dict[str, dict[str, int | None]] = {}
        self.record_calls = 0  # record_login calls
        self.imported: list[ImportedUser] = []  # the login map (find_imported)

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("database is locked")

    # accounts
    def state_of(self, address: str) -> State | None:
        self.asked.append(address)
        if self.block is not None:
            self.block.wait(10)
        self._check()
        return self.states.get(address)

    def state_of_either(self, address: str, fallback: str) -> State | None:
        state = self.state_of(address)
        return state if state is not None else self.state_of(fallback)

    def transition(self, address: str, new: State, *, expect: Any = ..., reason: str = "") -> Any:
        self._check()
        with self.lock:
            old = self.states.get(address)
            if expect is not ... and expect != old:
                raise Conflict(address)
            check_transition(address, old, new)
            self.states[address] = new
            self.transitions.append((address, old, new))
            return type("A", (), {"state": new})()

    def get(self, address: str) -> Any:
        self._check()
        state = self.states.get(address)
        return None if state is None else type("A", (), {"state": state, "has_password": address in self.hashes})()

    def set_password_hash(self, address: str, password_hash: str) -> None:
        self._check()
        self.hashes[address] = password_hash

    def add_login(self, address: str, login: str) -> None:
        self._check()
        self.logins.setdefault(address, set()).add(login)

    def touch_login(self, address: str) -> None:
        self._check()

    def record_login(
        self, address: str, login: str, *, password_hash: str | None = None, start_copy: bool = True
    ) -> State:
        self._check()
        self.record_calls += 1
        with self.lock:
            old = self.states.get(address)
            new = old
            if start_copy and old not in (State.COPYING, State.CUTOVER):
                new = State.COPYING
                check_transition(address, old, new)
                self.states[address] = new
                self.transitions.append((address, old, new))
            elif old is None:
                raise UnknownAccount(address)
            self.logins.setdefault(address, set()).add(login.lower())
            if password_hash is not None:
                self.hashes[address] = password_hash
            if start_copy:
                self.jobs[address] = 1
            assert new is not None
            return new

    def password_hash(self, address: str) -> str | None:
        self._check()
        return self.hashes.get(address)

    def find_imported(self, key: str) -> ImportedUser | None:
        self._check()
        for u in self.imported:
            if key in (u.login, u.address, *u.addresses):
                return u
        return None

    def enqueue(self, address: str, kind: str = "copy", *, not_before: float = 0.0) -> Any:
        self._check()
        with self.lock:
            self.jobs[address] = 1  # idempotent: one open job per account
        return None

    # the milter's message log
    def log_messages(self, records: list[MessageRecord]) -> None:
        self.calls += 1
        if self.block is not None:
            self.block.wait(10)
        if self.fail:
            raise RuntimeError("disk full")
        self.rows += records

    # the copier's folder marks and progress
    def folder_marks(self, address: str) -> dict[str, FolderMark]:
        return dict(self.marks.get(address, {}))

    def set_folder_mark(self, address: str, mark: FolderMark) -> None:
        self.marks.setdefault(address, {})[mark.folder] = mark

    def clear_folder_marks(self, address: str, folder: str | None = None) -> None:
        if folder is None:
            self.marks.pop(address, None)
        else:
            self.marks.get(address, {}).pop(folder, None)

    def set_progress(
        self,
        address: str,
        *,
        total: int | None = None,
        copied: int | None = None,
        bytes_copied: int | None = None,
    ) -> None:
        p = self.progress.setdefault(address, {})
        for k, v in (("total", total), ("copied", copied), ("bytes", bytes_copied)):
            if v is not None:
                p[k] = v
