"""Cutover on two front-end nodes: proxied sessions on *both* nodes are closed before the final delta reads the
legacy mailbox, and no node hands out a proxy answer while the account is in cutover.

Before (sidecar.migration.jobs ran `doveadm proxy kick` only on the node that ran the job, after `migrated`), a
session on the other node kept writing to the legacy mailbox after the delta had read it.
"""

from __future__ import annotations

import contextlib
import imaplib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from harness.labs import running_lab
from harness.throttle import Relay

from sidecar import config
from sidecar.states import State
from sidecar.store import open_store
from sidecar.store.base import Store

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


@pytest.fixture(scope="module")
def pair() -> Iterator[dict[str, Any]]:
    # the legacy IMAP port behind a slow relay: the copy lasts seconds, long enough to hold sessions open in it
    with Relay("127.0.0.2", rate=400_000) as relay:
        settings = {"legacy": {"imap_port": relay.port}, "limits": {"cutover_grace": 1.0, "lease_seconds": 10.0},
                    # the relay leads nowhere until the lab is up: no NAMESPACE question at start
                    "mail": {"namespace_prefix": "", "namespace_separator": "/"}}  # fmt: skip
        with running_lab("ap-2c-", users=2, store="postgresql", nodes=2, messages_per_user=200,
                         settings=settings) as info:  # fmt: skip
            relay.point_at(info["legacy"]["host"], info["legacy"]["imap"])
            yield info


@pytest.fixture(scope="module")
def store(pair: dict[str, Any]) -> Iterator[Store]:
    s = open_store(config.load(pair["config"]).store.url)
    yield s
    s.close()


class Session(threading.Thread):
    """A proxied IMAP session on one node that keeps asking until the server closes it."""

    def __init__(self, node: dict[str, Any], user: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.c = imaplib.IMAP4(node["host"], node["imap"], timeout=60)
        self.c.login(user["login"], user["password"])
        self.c.select("INBOX")
        self.closed_at = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.c.noop()
            except (imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError):
                self.closed_at = time.time()
                break
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            self.c.shutdown()


def test_sessions_on_every_node_close_before_the_final_delta(pair: dict[str, Any], store: Store) -> None:
    user = pair["users"][0]
    address = user["address"]
    sessions = [Session(node, user) for node in pair["nodes"] for _ in range(2)]  # the first login starts the copy
    for s in sessions:
        s.start()
    # while the account is in cutover, no node answers a login with a proxy: a login waits (temporary failure)
    deadline = time.monotonic() + 120
    while store.state_of(address) is not State.CUTOVER:
        assert time.monotonic() < deadline and store.state_of(address) is not State.MIGRATED, store.get(address)
        time.sleep(0.02)
    refused = 0
    for node in pair["nodes"]:
        with imaplib.IMAP4(node["host"], node["imap"], timeout=60) as c:
            try:
                c.login(user["login"], user["password"])
            except imaplib.IMAP4.error as e:
                assert "UNAVAILABLE" in str(e) or "Temporary" in str(e), e
                refused += 1
            else:  # only if the account is migrated already (a local login)
                assert store.state_of(address) is State.MIGRATED
    deadline = time.monotonic() + 120
    while store.state_of(address) is not State.MIGRATED:
        assert time.monotonic() < deadline and store.state_of(address) is not State.FAILED, store.get(address)
        time.sleep(0.1)
    for s in sessions:
        s.join(30)
        s.stop.set()
    events = {e.kind: e for e in store.events(address)}
    quiesced = events["quiesced"].at
    closed = sorted(s.closed_at for s in sessions)
    assert all(closed), "a proxied session survived the cutover"
    assert closed[-1] <= quiesced, (closed, quiesced)  # every node closed its sessions before the delta
    assert refused >= 1
    # both nodes confirmed each kick round (not the auth cache flush that follows the migration: kind 'flush')
    with store._read() as cur:  # type: ignore[attr-defined]
        rows = cur.execute(
            "SELECT k.id, count(a.node) FROM kicks k JOIN kick_acks a ON a.kick_id = k.id "
            "WHERE k.address = ? AND k.kind = 'kick' GROUP BY k.id", (address,)
        ).fetchall()
    assert len(rows) >= 2 and all(n == 2 for _id, n in rows), rows
