"""Dovecot's auth cache is on (sql passdb steps) and never outlives a change: two front-end nodes sharing one
PostgreSQL store, real Dovecot on both.

- a user who becomes migrated logs in natively at once on both nodes, although both cached "unknown user" for the
  sql steps while the user was proxied (checked with both sidecars stopped: only the sql passdb can answer);
- an account migrated in bulk (no hash yet): its first login is verified on the legacy server through the sidecar, and
  the next one is native at once, although that node cached "unknown user" for the sql steps on the way;
- `autoport passwd` on one node: the new password works at once and the old one is refused at once, on this node
  and on the other one (whose cache held the old hash: only the flush request carried by the store reaches it).
"""

from __future__ import annotations

import imaplib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.cli import autoport
from harness.waiting import wait_for, wait_state

from sidecar.lab import launcher, proc
from sidecar.states import State
from sidecar.store.base import Store

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

LAB = {
    "prefix": "ap-cache-", "users": 3, "store": "postgresql", "nodes": 2, "messages_per_user": 300,
    "settings": {"limits": {"cutover_grace": 0.5}},
}  # fmt: skip


def can_login(node: dict[str, Any], login: str, password: str) -> bool:
    with imaplib.IMAP4(node["host"], node["imap"], timeout=60) as c:
        try:
            c.login(login, password)
        except imaplib.IMAP4.error:
            return False
        return True


def sidecar_dirs(lab: dict[str, Any]) -> list[tuple[Path, str]]:
    """(the directory whose state has the sidecar's pid, the lab_restart name) of each node."""
    return [(Path(lab["dir"]), "sidecar"), (Path(lab["dir"]) / "node2", "node2:sidecar")]


@pytest.fixture
def sidecars_stopped(lab: dict[str, Any]) -> Iterator[None]:
    """Both sidecars stopped: a login then succeeds only through the sql passdb (step 3 has nobody to ask)."""
    pids = [proc.load_state(d)["pids"]["sidecar"] for d, _ in sidecar_dirs(lab)]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    for pid in pids:
        wait_for(lambda pid=pid: not proc.pid_alive(pid), 30, "a sidecar to stop")
    try:
        yield
    finally:
        for _, name in sidecar_dirs(lab):
            launcher.lab_restart(Path(lab["dir"]), name)


def cache_is_on(node: dict[str, Any]) -> None:
    out = subprocess.run(["doveconf", "-c", node["dovecot_config"], "-h", "auth_cache_size"], capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    assert out not in ("", "0"), out


def migrate(lab: dict[str, Any], store: Store, user: dict[str, Any]) -> None:
    """Proxied logins on both nodes (each caches "unknown user" for the sql steps), then the migration, its
    steps after the switch included (the copy job closes after them)."""
    first, second = lab["nodes"]
    assert can_login(second, user["login"], user["password"])  # verified on the legacy server, proxied
    before = store.state_of(user["address"])
    # answered by step 3 (or refused for the moment in cutover): what matters is that steps 1 and 2 said "unknown"
    can_login(first, user["login"], user["password"])
    assert before is not State.MIGRATED, "migrated before the login on the first node: nothing cached there"
    wait_state(store, user["address"], State.MIGRATED, timeout=120)
    wait_for(lambda: all(j.status == "done" for j in store.jobs(user["address"]) if j.kind == "copy"), 60,
             "the copy job to close", interval=0.1)  # fmt: skip
    flushed_everywhere(store)


def test_the_cache_is_on_on_both_nodes(lab: dict[str, Any]) -> None:
    for node in lab["nodes"]:
        cache_is_on(node)


def test_a_user_who_becomes_migrated_logs_in_natively_at_once(
    lab: dict[str, Any], store: Store, request: pytest.FixtureRequest
) -> None:
    user = lab["users"][0]
    migrate(lab, store, user)
    request.getfixturevalue("sidecars_stopped")
    for node in lab["nodes"]:
        assert can_login(node, user["login"], user["password"]), node["host"]
        assert not can_login(node, user["login"], user["password"] + "x"), node["host"]


def flushed_everywhere(store: Store) -> None:
    """Every live node carried every flush request out (its NodeAgent acknowledged it)."""
    wait_for(lambda: all(not [k for k in store.pending_kicks(n, 0) if k.kind == "flush"] for n in store.live_nodes(60)),
             30, "every node to flush its auth cache", interval=0.1)  # fmt: skip


def test_a_bulk_migrated_account_logs_in_natively_after_its_first_login(
    lab: dict[str, Any], store: Store, request: pytest.FixtureRequest
) -> None:
    user = lab["users"][2]
    out = autoport(lab, "migrate", user["address"], "--wait", "--timeout", "240")
    assert out.returncode == 0, out.stdout + out.stderr
    account = store.get(user["address"])
    assert account is not None and account.state is State.MIGRATED and not account.has_password
    flushed_everywhere(store)  # (the migration's own flush, before any login)
    first = lab["nodes"][0]
    # the sql steps find no hash ("unknown user", cached), the sidecar verifies on the legacy server, stores it
    assert can_login(first, user["login"], user["password"])
    account = store.get(user["address"])
    assert account is not None and account.has_password
    flushed_everywhere(store)
    request.getfixturevalue("sidecars_stopped")
    for node in lab["nodes"]:  # only the sql passdb can answer now
        assert can_login(node, user["login"], user["password"]), node["host"]
        assert not can_login(node, user["login"], user["password"] + "x"), node["host"]


def test_passwd_takes_effect_at_once_on_every_node(lab: dict[str, Any], store: Store) -> None:
    user = lab["users"][1]
    migrate(lab, store, user)
    first, second = lab["nodes"]
    old, new = user["password"], user["password"] + "-New1"
    for node in (first, second):  # native logins: both caches hold the stored (old) hash now
        for _ in range(2):
            assert can_login(node, user["login"], old)
    out = autoport(lab, "passwd", user["address"], "--stdin", stdin=new + "\n")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "auth cache flushed here and on 2 node(s)" in out.stdout, out.stdout + out.stderr
    for node in (second, first):  # the other node first: only the store's flush request reached it
        assert not can_login(node, user["login"], old), f"{node['host']} still accepts the old password"
        assert can_login(node, user["login"], new), node["host"]
    assert old not in out.stdout + out.stderr and new not in out.stdout + out.stderr
