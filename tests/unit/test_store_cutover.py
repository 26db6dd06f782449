"""Store v3: the cutover handshake between nodes (heartbeats, kick requests and their acknowledgements) and blocked
sweeps, on SQLite and PostgreSQL (the backend fixtures of tests/conftest.py)."""

from __future__ import annotations

import pytest
from harness.backends import Backend

from sidecar.states import State
from sidecar.store import schema
from sidecar.store.base import UnknownAccount
from sidecar.store.sql import SqlStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_nodes_kicks_and_acks(backend: Backend) -> None:
    s = backend.open()
    assert s.init() == schema.latest()
    clock = Clock()
    s._clock = clock  # type: ignore[attr-defined]
    s.node_heartbeat("a")
    clock.now += 20
    s.node_heartbeat("b")
    assert s.live_nodes(10) == ["b"]
    assert s.live_nodes(30) == ["a", "b"]
    s.node_heartbeat("a")
    assert s.live_nodes(1) == ["a", "b"]

    k = s.request_kick("alice@example.org", ["Alice", "alice@example.org"])
    assert k.logins == ("Alice", "alice@example.org")
    assert [x.id for x in s.pending_kicks("a", 0)] == [k.id]
    assert s.pending_kicks("a", clock.now + 1) == []  # older than the window: ignored
    s.ack_kick(k.id, "a", "0 sessions")
    s.ack_kick(k.id, "a", "again")  # idempotent
    assert s.pending_kicks("a", 0) == []
    assert [x.id for x in s.pending_kicks("b", 0)] == [k.id]
    assert s.kick_acks(k.id) == {"a": "0 sessions"}


def test_sweep_blocks(backend: Backend) -> None:
    s: SqlStore = backend.open()
    s.init()
    with pytest.raises(UnknownAccount):
        s.set_sweep_block("nobody@example.org", "no credentials")
    s.transition("alice@example.org", State.COPYING)
    s.set_sweep_block("alice@example.org", "no credentials")
    first = s.sweep_blocks()[0]
    s.set_sweep_block("alice@example.org", "legacy refused the credentials")
    (block,) = s.sweep_blocks()
    assert (block.reason, block.since) == ("legacy refused the credentials", first.since)
    s.clear_sweep_block("alice@example.org")
    assert s.sweep_blocks() == []
