"""The cutover handshake (sidecar.migration.cutover) on a real SQLite store, the node actions replaced: every live
node confirms before the final delta reads the legacy mailbox; a node that does not confirm sends the account back
to the legacy server with its held mail; the job runner orders it all (kick, grace, kick again, delta)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.jobs import A, Recorder, first_login, run_one
from harness.waiting import wait_for

from sidecar import config
from sidecar.auth.policy import CredentialCache
from sidecar.migration import cutover
from sidecar.migration.cutover import KickTimeout, NodeAgent, kick_everywhere
from sidecar.migration.jobs import Hooks, JobRunner
from sidecar.states import State
from sidecar.store import open_store
from sidecar.store.base import Kick, Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    s.init()
    yield s
    s.close()


def cfg(tmp_path: Path, **limits: Any) -> config.Config:
    return config.from_dict({"target": {"mail_root": str(tmp_path / "mail")},
                             "limits": {"cutover_grace": 0.2, "kick_timeout": 2.0, **limits}})  # fmt: skip


class Node:
    """A node agent whose actions are recorded (and can fail)."""

    def __init__(self, c: config.Config, store: Store, name: str, log: list[str]) -> None:
        self.log = log
        self.fail = False
        self.name = name
        self.agent = NodeAgent(c, store, node=name, act=self.act, interval=0.05)

    def act(self, c: config.Config, kicks: list[Kick]) -> dict[int, str]:
        if self.fail:
            raise OSError("doveadm: no such file")
        self.log += [f"{self.name}:{k.address}" for k in kicks]
        return {k.id: "kicked" for k in kicks}


def test_every_live_node_confirms(store: Store, tmp_path: Path) -> None:
    c, log = cfg(tmp_path), list[str]()
    nodes = [Node(c, store, n, log) for n in ("n1", "n2")]
    for n in nodes:
        n.agent.start()
    try:
        acks = kick_everywhere(store, A, ["alice"], timeout=5, node_timeout=5)
        assert set(acks) == {"n1", "n2"}
        assert sorted(log) == [f"n1:{A}", f"n2:{A}"]
        # a node that cannot act holds the cutover back, until the timeout
        nodes[1].fail = True
        with pytest.raises(KickTimeout, match="n2"):
            kick_everywhere(store, A, ["alice"], timeout=0.5, node_timeout=5)
        # a node that stopped heartbeating is not waited for
        nodes[1].agent.stop()
        store._clock = lambda: __import__("time").time() + 10  # type: ignore[attr-defined]
        nodes[0].agent.tick()
        acks = kick_everywhere(store, A, ["alice"], timeout=5, node_timeout=5)
        assert set(acks) == {"n1"}
    finally:
        for n in nodes:
            n.agent.stop()


def test_a_node_that_cannot_carry_a_request_out_tries_it_again_less_and_less_often(
    store: Store, tmp_path: Path
) -> None:
    """A node whose doveadm fails (its Dovecot stopped) retries a pending request after 1, 2, 4, ... s up to
    RETRY_MAX, not at every heartbeat for KICK_WINDOW; a new request is still tried at once, and the old one is
    confirmed at its next try once the node works again."""
    now = [1000.0]
    tries: list[tuple[float, list[str]]] = []
    broken: set[str] = {A}  # addresses whose requests fail on this node
    raising = [False]  # the whole batch fails (the route cache could not be cleared)

    def act(c: config.Config, kicks: list[Kick]) -> dict[int, str]:
        tries.append((now[0] - 1000, [k.address for k in kicks]))
        if raising[0]:
            raise OSError("postqueue: cannot connect")
        return {k.id: "kicked" for k in kicks if k.address not in broken}

    agent = NodeAgent(cfg(tmp_path), store, node="n1", act=act, interval=60, clock=lambda: now[0])
    old = store.request_kick(A, ["alice"])
    for t in range(61):
        now[0] = 1000.0 + t
        agent.tick()
    assert [t for t, _ in tries] == [0, 1, 3, 7, 15, 31]  # 6 tries in a minute, not 61
    assert cutover.RETRY_MAX == 30
    # a new request is tried at the next heartbeat, alone: the old one is not due before 61
    b = "bob@example.org"
    new = store.request_kick(b, ["bob"])
    tries.clear()
    now[0] = 1045.0
    agent.tick()
    assert tries == [(45, [b])] and set(store.kick_acks(new.id)) == {"n1"}
    # the node works again: the old request is confirmed at its next try
    broken.clear()
    now[0] = 1060.0
    agent.tick()
    assert tries == [(45, [b])] and store.kick_acks(old.id) == {}
    now[0] = 1061.0
    agent.tick()
    assert tries[-1] == (61, [A]) and set(store.kick_acks(old.id)) == {"n1"}
    # a batch that fails as a whole backs off too
    raising[0] = True
    third = store.request_kick(b, ["bob"])
    tries.clear()
    for t in range(62, 70):
        now[0] = 1000.0 + t
        agent.tick()
    assert [t for t, _ in tries] == [62, 63, 65, 69] and store.kick_acks(third.id) == {}


def test_runner_kicks_twice_before_the_delta(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c, log = cfg(tmp_path), list[str]()
    node = Node(c, store, "n1", log)
    node.agent.start()
    rec, creds = Recorder(), CredentialCache()
    order: list[str] = []
    copy = rec.copy

    def copy_logged(*args: Any, mode: str, **kw: Any) -> Any:
        order.append(f"copy {mode} after {len(log)} kick(s)")
        return copy(*args, mode=mode, **kw)

    def quiesce(address: str, logins: list[str]) -> None:
        assert store.state_of(address) is State.CUTOVER
        cutover.quiesce(c, store, address, logins)

    hooks = Hooks(release_held=rec.release, after_migrated=rec.after, quiesce=quiesce)
    runner = JobRunner(c, store, creds, owner="n1", hooks=hooks, copy=copy_logged)
    try:
        first_login(store, creds)
        run_one(runner, store)
    finally:
        node.agent.stop()
    assert order == ["copy initial after 0 kick(s)", "copy delta after 2 kick(s)"]
    account = store.get(A)
    assert account is not None and account.state is State.MIGRATED


def test_a_node_that_does_not_confirm_sends_the_account_back_to_legacy(store: Store, tmp_path: Path) -> None:
    c, log = cfg(tmp_path, kick_timeout=0.3), list[str]()
    node = Node(c, store, "n1", log)
    node.fail = True
    node.agent.start()
    rec, creds = Recorder(), CredentialCache()
    hooks = Hooks(release_held=rec.release, after_migrated=rec.after,
                  quiesce=lambda a, logins: cutover.quiesce(c, store, a, logins))  # fmt: skip
    runner = JobRunner(c, store, creds, owner="n1", hooks=hooks, copy=rec.copy)
    try:
        first_login(store, creds)
        run_one(runner, store)
    finally:
        node.agent.stop()
    account = store.get(A)
    assert account is not None and account.state is State.FAILED and "did not confirm" in account.last_error
    assert rec.copies == [(A, "initial")]  # the delta never read the legacy mailbox
    assert rec.released == [A]  # held mail goes back to the legacy relay
    (job,) = [j for j in store.jobs(A) if j.kind == "copy"]
    assert job.status == "queued"  # retried later
    # next time the node works: the retry migrates the account
    node.fail = False
    node.agent.stopping.clear()
    node.agent.start()
    store.wake(A, "copy")
    run_one(runner, store)
    node.agent.stop()
    account = store.get(A)
    assert account is not None and account.state is State.MIGRATED


def test_the_grace_between_the_kicks_leaves_the_copy_slot_to_the_next_account(store: Store, tmp_path: Path) -> None:
    """One copy slot, cutover_grace 2 s: B's initial copy runs while A waits between its two kicks (issue 17)."""
    c, log = cfg(tmp_path, cutover_grace=2.0, copy_concurrency=1), list[str]()
    node = Node(c, store, "n1", log)
    node.agent.start()
    rec, creds = Recorder(), CredentialCache()
    B = "bob@example.test"
    hooks = Hooks(release_held=rec.release, after_migrated=rec.after,
                  quiesce=lambda a, logins: cutover.quiesce(c, store, a, logins))  # fmt: skip
    runner = JobRunner(c, store, creds, owner="n1", hooks=hooks, copy=rec.copy)
    first_login(store, creds)
    runner.start()
    try:
        wait_for(lambda: store.state_of(A) is State.CUTOVER, 10, f"{A} in cutover")
        store.transition(B, State.COPYING, reason="first login")
        creds.put(B, B, "pw")
        store.enqueue(B, "copy")
        runner.poke()
        for who in (A, B):
            wait_for(lambda w=who: store.state_of(w) is State.MIGRATED, 15, f"{who} to migrate")  # type: ignore[misc]
    finally:
        runner.stop()
        node.agent.stop()
    assert rec.copies.index((B, "initial")) < rec.copies.index((A, "delta")), rec.copies
