"""The sidecar's deferred argon2 hashes run at nice 19: a storm of first logins queues hashes, never logins."""

from __future__ import annotations

import os
import threading
from typing import cast

from harness.fakes import FakeStore

from sidecar import daemon
from sidecar.auth.policy import AuthPolicy
from sidecar.config import Config, LegacyConfig, MailConfig, TargetConfig
from sidecar.legacy.verify import LegacyAuthError
from sidecar.store.base import Store
from sidecar.wire.authproto import OK, Request


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


class _Verifier:
    def verify(self, login: str, password: str, *, client_ip: str = "") -> str:
        if (login, password) != ("alice@example.org", "right-pw"):
            raise LegacyAuthError("imap", "[AUTHENTICATIONFAILED] Authentication failed.")
        return "imap"


def test_the_hash_thread_runs_at_nice_19_and_nothing_else_does() -> None:
    before = _nice()
    assert before < daemon.HASH_NICE  # else the test could not tell
    pool = daemon.hash_executor()
    try:
        assert pool.submit(_nice).result(10) == daemon.HASH_NICE
        # the nice value is the thread's own: the caller and threads started later keep theirs
        assert _nice() == before
        seen: list[int] = []
        t = threading.Thread(target=lambda: seen.append(_nice()))
        t.start()
        t.join()
        assert seen == [before]
    finally:
        pool.shutdown(wait=True)
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the process (main thread) is untouched


def test_a_first_login_is_answered_at_normal_priority_and_hashed_at_nice_19() -> None:
    cfg = Config(
        legacy=LegacyConfig(host="192.0.2.10", imap_port=143),
        mail=MailConfig(domains=["example.org"]),
        target=TargetConfig(mail_uid=5000, mail_gid=5001),
    )
    store = FakeStore()
    hashed_at: list[int] = []

    def hasher(password: str) -> str:
        hashed_at.append(_nice())
        return "{PLAIN}" + password

    pool = daemon.hash_executor()
    try:
        policy = AuthPolicy(cfg, cast(Store, store), _Verifier(), hasher=hasher, defer=pool.submit)
        reply = policy.decide(Request("alice", "right-pw", "imap", "198.51.100.7", "192.0.2.1"))
        assert reply.status == OK
        answered_at = _nice()
    finally:
        pool.shutdown(wait=True)
    assert store.hashes["alice@example.org"] == "{PLAIN}right-pw"
    assert hashed_at == [daemon.HASH_NICE]
    assert answered_at < daemon.HASH_NICE
