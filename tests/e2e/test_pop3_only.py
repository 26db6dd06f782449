"""A legacy server that speaks only POP3 (the original product's setting), through the whole lab: the user logs
in at the target over POP3 (proxied, verified over POP3), the copier copies INBOX over POP3, and after the switch
the target lists the same UIDLs in the same order with the same messages: a POP3 client that kept its UIDLs
downloads nothing again.
"""

from __future__ import annotations

import poplib
from collections.abc import Iterator
from typing import Any

import pytest
from harness import e2e_mail
from harness.labs import running_lab

from sidecar import config
from sidecar.states import State
from sidecar.store import open_store
from sidecar.store.base import Store

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def plab() -> Iterator[dict[str, Any]]:
    with running_lab("ap-pop-", users=2, profile="pop3-only") as info:
        yield info


@pytest.fixture(scope="module")
def store(plab: dict[str, Any]) -> Iterator[Store]:
    s = open_store(config.load(plab["config"]).store.url)
    yield s
    s.close()


def pop3_view(host: str, port: int, user: dict[str, Any]) -> list[tuple[str, int, bytes]]:
    """(UIDL, LIST size, whole message) in POP3 order; the session ends without QUIT (nothing committed)."""
    p = poplib.POP3(host, port, timeout=30)
    try:
        p.user(user["login"])
        p.pass_(user["password"])
        sizes = dict(line.decode().split() for line in p.list()[1])
        out = []
        for line in p.uidl()[1]:
            num, uidl = line.decode().split()
            out.append((uidl, int(sizes[num]), b"\r\n".join(p.top(int(num), 10**9)[1])))
        return out
    finally:
        p.close()


def test_pop3_only_user_migrates_with_the_same_uidls(plab: dict[str, Any], store: Store) -> None:
    lg, tg = plab["legacy"], plab["target"]
    assert lg["imap"] == 0 and lg["pop3"]
    user = plab["users"][0]
    before = pop3_view(lg["host"], lg["pop3"], user)
    assert len(before) > 5

    assert pop3_view(tg["host"], tg["pop3"], user) == before  # first login: proxied to the legacy server

    def migrated() -> bool:
        a = store.get(user["address"])
        assert a is None or a.state is not State.FAILED, store.events(user["address"])
        return a is not None and a.state is State.MIGRATED

    e2e_mail.wait_for(migrated, 90, f"{user['address']} to be migrated")
    after = pop3_view(tg["host"], tg["pop3"], user)
    assert after == before
    # a client that kept the UIDLs it saw on the legacy server finds nothing new to download
    assert {u for u, _s, _m in after} - {u for u, _s, _m in before} == set()
    account = store.get(user["address"])
    assert account is not None and account.messages_copied == len(before)
