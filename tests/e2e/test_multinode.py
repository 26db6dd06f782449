"""Two front-end nodes (Postfix + Dovecot + sidecar each) sharing one PostgreSQL store and one mail root.

Simultaneous first logins of one user on both nodes copy the mailbox once; a node killed in the middle of a copy
loses its lease, and the other node finishes the copy (with the legacy admin credentials: the password lived only
in the dead node's memory).
"""

from __future__ import annotations

import imaplib
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from harness.waiting import wait_for, wait_state

from sidecar.lab import launcher, proc
from sidecar.states import State
from sidecar.store.base import Store

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


LAB = {
    "prefix": "ap-2n-", "users": 3, "store": "postgresql", "nodes": 2, "messages_per_user": 400,
    "settings": {"limits": {"lease_seconds": 3.0, "cutover_grace": 0.5}},
}  # fmt: skip


def login(node: dict[str, Any], user: dict[str, Any]) -> None:
    with imaplib.IMAP4(node["host"], node["imap"], timeout=60) as c:
        c.login(user["login"], user["password"])
        c.select("INBOX", readonly=True)


def inbox_count(host: str, port: int, user: dict[str, Any]) -> tuple[bytes, int]:
    with imaplib.IMAP4(host, port, timeout=60) as c:
        c.login(user["login"], user["password"])
        _typ, data = c.select("INBOX", readonly=True)
        return c.response("UIDVALIDITY")[1][0] or b"", int(data[0] or 0)


def test_both_nodes_serve_the_same_migration(lab: dict[str, Any]) -> None:
    first, second = lab["nodes"]
    assert first["host"] != second["host"]
    assert first["mail_root"] == second["mail_root"]


def test_simultaneous_first_logins_on_both_nodes_copy_once(lab: dict[str, Any], store: Store) -> None:
    user = lab["users"][0]
    errors: list[BaseException] = []

    def go(node: dict[str, Any]) -> None:
        try:
            login(node, user)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=go, args=(node,)) for node in lab["nodes"] for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    wait_state(store, user["address"], State.MIGRATED, timeout=120)
    assert len([j for j in store.jobs(user["address"]) if j.kind == "copy"]) == 1
    transitions = [e.detail.split(":")[0] for e in store.events(user["address"]) if e.kind == "transition"]
    assert sorted(transitions) == sorted(["(none) -> copying", "copying -> cutover", "cutover -> migrated"])
    lg = lab["legacy"]
    assert inbox_count(lab["nodes"][1]["host"], lab["nodes"][1]["imap"], user) == inbox_count(
        lg["host"], lg["imap"], user
    )


def test_node_killed_mid_copy_the_other_finishes(lab: dict[str, Any], store: Store) -> None:
    user = lab["users"][1]
    login(lab["nodes"][0], user)
    # find the node that leased the copy job, and kill its sidecar while the copy runs
    leased = wait_for(lambda: [j for j in store.jobs(user["address"]) if j.status == "leased"], 30,
                      "a node to lease the copy job", interval=0.01)  # fmt: skip
    job = leased[0]
    pid = int(job.lease_owner.rsplit(":", 1)[1])
    state_at_kill = store.state_of(user["address"])
    os.kill(pid, signal.SIGKILL)
    assert state_at_kill in (State.COPYING, State.CUTOVER), "the copy finished before the kill: test proves nothing"
    killed_node = 0 if pid == proc.load_state(Path(lab["dir"]))["pids"].get("sidecar") else 1
    try:
        wait_state(store, user["address"], State.MIGRATED, timeout=120)
        # held mail released and sessions kicked after the switch, then the copy job closes
        wait_for(lambda: store.jobs(user["address"])[0].status == "done", 60, "the copy job to close", interval=0.1)
        (done,) = [j for j in store.jobs(user["address"]) if j.kind == "copy"]
        assert done.status == "done" and done.attempts >= 2  # leased again by the survivor
        lg = lab["legacy"]
        survivor = lab["nodes"][1 - killed_node]
        assert inbox_count(survivor["host"], survivor["imap"], user) == inbox_count(lg["host"], lg["imap"], user)
    finally:
        launcher.lab_restart(
            Path(lab["dir"]), "sidecar" if killed_node == 0 else "node2:sidecar"
        )
