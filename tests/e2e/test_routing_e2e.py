"""Postfix routing end to end: real target Postfix + Dovecot + sidecar, real legacy server, SMTP from outside.

One lab for the module (legacy with 8 users: alice..heidi). Each test uses its own users, so the order of
the tests does not matter:
    alice, dave, frank, grace  unmigrated (legacy)     bob, heidi  migrated
    erin, carol                 cutover, then released by sidecar.migration.release
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness.e2e_mail import (
    legacy_count,
    message_id,
    migrate,
    move,
    postfix_config,
    postfix_log,
    queue,
    queue_id,
    send,
    target_count,
    wait_for,
)

from sidecar import config
from sidecar.lab import launcher, proc
from sidecar.migration import release
from sidecar.states import State
from sidecar.store.base import MessageRecord, Store

pytestmark = pytest.mark.e2e

D = "@example.test"
LMTP = "lmtp:unix:private/dovecot-lmtp"


LAB = {"prefix": "ap-route-", "users": 8}


@pytest.fixture(scope="module")
def store(store: Store) -> Store:
    """The lab's store, with bob and heidi migrated."""
    migrate(store, "bob" + D)
    migrate(store, "heidi" + D)
    return store


@pytest.fixture(scope="module")
def cfg(lab: dict[str, Any]) -> config.Config:
    return config.load(lab["config"])


def smtp(lab: dict[str, Any], rcpts: list[str], mid: str, **kw: Any) -> tuple[dict[str, tuple[int, str]], str]:
    replies, data = send(lab["target"]["host"], lab["target"]["smtp"], rcpts, mid, **kw)
    return replies, queue_id(data)


def log_rows(store: Store, recipient: str, mid: str, n: int = 1) -> list[MessageRecord]:
    def rows() -> list[MessageRecord]:
        found = [r for r in store.message_log(recipient) if r.message_id == mid]
        return found if len(found) >= n else []

    found: list[MessageRecord] = wait_for(rows, 10, f"message log row for {recipient}")
    return found


def lines(lab: dict[str, Any], qid: str, rcpt: str) -> list[str]:
    return [ln for ln in postfix_log(lab).splitlines() if f"{qid}: to=<{rcpt}>" in ln]


def test_unmigrated_user_gets_mail_on_the_legacy_server(lab: dict[str, Any], store: Store) -> None:
    mid = message_id()
    replies, qid = smtp(lab, ["alice" + D], mid)
    assert replies["alice" + D][0] == 250
    wait_for(lambda: legacy_count(lab, "alice" + D, mid) == 1, what="the message in alice's legacy INBOX")
    assert target_count(lab, "alice" + D, mid) == 0
    (row,) = log_rows(store, "alice" + D, mid)
    cfg_legacy = lab["legacy"]
    assert row.route == f"legacy:[{cfg_legacy['host']}]:{cfg_legacy['smtp']}"
    assert row.queue_id == qid and row.sender == "someone@outside.test" and not row.from_legacy


def test_migrated_user_gets_mail_in_the_target_mailbox(lab: dict[str, Any], store: Store) -> None:
    mid = message_id()
    replies, qid = smtp(lab, ["bob" + D], mid)
    assert replies["bob" + D][0] == 250
    wait_for(lambda: target_count(lab, "bob" + D, mid) == 1, what="the message in bob's target INBOX")
    assert legacy_count(lab, "bob" + D, mid) == 0
    assert any("status=sent" in ln and "dovecot-lmtp" in ln for ln in lines(lab, qid, "bob" + D))
    (row,) = log_rows(store, "bob" + D, mid)
    assert row.route == LMTP and row.queue_id == qid


def test_address_extension_routes_like_the_account(lab: dict[str, Any], store: Store) -> None:
    mid = message_id()
    replies, _ = smtp(lab, ["heidi+news" + D], mid)
    assert replies["heidi+news" + D][0] == 250
    wait_for(lambda: target_count(lab, "heidi" + D, mid) == 1, what="heidi+news in heidi's target INBOX")
    assert log_rows(store, "heidi+news" + D, mid)[0].route == LMTP


def test_unknown_user_is_rejected_at_rcpt_with_the_legacy_reason(lab: dict[str, Any], store: Store) -> None:
    mid = message_id()
    replies, data = send(lab["target"]["host"], lab["target"]["smtp"], ["nobody" + D, "alice" + D], mid)
    code, text = replies["nobody" + D]
    assert code == 550
    assert "5.1.1" in text and "User unknown" in text and lab["legacy"]["host"] in text
    assert replies["alice" + D][0] == 250  # the other recipient of the same message is unaffected
    assert data is not None and data[0] == 250
    assert store.message_log("nobody" + D) == []  # a rejected recipient is never logged


def test_postmap_query_answers_by_state(lab: dict[str, Any], store: Store) -> None:
    """The README's operability check: `postmap -q ADDRESS socketmap:...:transport`."""
    move(store, "carol" + D, State.COPYING, State.CUTOVER)
    sm = lab["target"]["socketmap"]
    relay = f"legacy:[{lab['legacy']['host']}]:{lab['legacy']['smtp']}"

    def q(address: str, table: str = "transport") -> str:
        p = subprocess.run(
            ["postmap", "-c", postfix_config(lab), "-q", address, f"socketmap:{sm}:{table}"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        return p.stdout.strip() if p.returncode == 0 else f"exit {p.returncode}"

    assert q("alice" + D) == relay
    assert q("nobody" + D) == relay  # unknown: the legacy server decides (and rejects at RCPT)
    assert q("bob" + D) == LMTP
    assert q("Bob+x" + D) == LMTP
    assert q("carol" + D) == "retry:4.3.2 mailbox migration in progress"
    assert q("carol" + D, "verify") == relay  # recipient probes for held accounts still ask the legacy server
    assert q("someone@outside.test") == "exit 1"  # not ours: NOTFOUND, Postfix's default transport
    assert q("probe@autoport.invalid") == "discard:autoport release probe"


def _held(lab: dict[str, Any], qid: str, rcpt: str) -> bool:
    return any(
        m["queue_id"] == qid and m["queue_name"] == "deferred"
        and any(r["address"] == rcpt and r.get("delay_reason") == release.HOLD_REASON for r in m["recipients"])
        for m in queue(lab)
    )  # fmt: skip


def test_cutover_holds_mail_then_release_delivers_it_within_seconds(
    lab: dict[str, Any], store: Store, cfg: config.Config
) -> None:
    erin = "erin" + D
    move(store, erin, State.COPYING, State.CUTOVER)
    mid = message_id()
    # the sender is a legacy user: a bounce or delay DSN would land in grace's legacy INBOX
    replies, qid = smtp(lab, [erin], mid, sender="grace" + D)
    assert replies[erin][0] == 250
    wait_for(lambda: _held(lab, qid, erin), what="the message deferred in the queue")
    assert any("dsn=4.3.2, status=deferred (mailbox migration in progress)" in ln for ln in lines(lab, qid, erin))
    (row,) = log_rows(store, erin, mid)
    assert row.route == "retry" and row.queue_id == qid
    assert release.release_held(cfg, store, erin) == 0  # still in cutover: nothing is released

    store.transition(erin, State.MIGRATED, expect=State.CUTOVER)
    # right after the deferral, qmgr's one-entry resolve cache still says retry: for this (sender, recipient);
    # release_held gets past it (a plain `postqueue -i` would defer the message again, for minutes)
    assert release.release_held(cfg, store, erin) == 1
    wait_for(lambda: target_count(lab, erin, mid) == 1, 5, "the released message in erin's target INBOX")
    assert not any(m["queue_id"] == qid for m in queue(lab))
    assert legacy_count(lab, erin, mid) == 0
    assert [ln for ln in postfix_log(lab).splitlines() if qid in ln and "non-delivery" in ln] == []
    assert legacy_count(lab, "grace" + D, mid) == 0  # no DSN quoting the message reached the sender
    assert release.release_held(cfg, store, erin) == 0  # nothing left: a second release is a no-op


def test_one_message_to_five_recipients_in_mixed_states(lab: dict[str, Any], store: Store, cfg: config.Config) -> None:
    carol = "carol" + D
    with contextlib.suppress(Exception):  # test_postmap_query_answers_by_state may have moved carol already
        move(store, carol, State.COPYING, State.CUTOVER)
    assert store.state_of(carol) is State.CUTOVER
    legacy_users, local_users = ["dave" + D, "frank" + D], ["bob" + D, "heidi" + D]
    rcpts = [legacy_users[0], local_users[0], carol, legacy_users[1], local_users[1]]
    mid = message_id()
    replies, qid = smtp(lab, rcpts, mid)
    assert all(code == 250 for code, _ in replies.values()), replies
    for u in legacy_users:
        wait_for(lambda u=u: legacy_count(lab, u, mid) == 1, what=f"the message at {u} on legacy")
    for u in local_users:
        wait_for(lambda u=u: target_count(lab, u, mid) == 1, what=f"the message at {u} on the target")
    wait_for(lambda: _held(lab, qid, carol), what="carol's copy held")
    (held,) = [m for m in queue(lab) if m["queue_id"] == qid]
    assert [r["address"] for r in held["recipients"]] == [carol]  # only the held copy waits
    routes = {r: log_rows(store, r, mid)[0].route for r in rcpts}
    assert routes[carol] == "retry" and routes["bob" + D] == LMTP
    assert routes["dave" + D].startswith("legacy:[")

    store.transition(carol, State.MIGRATED)
    report = release.release_held_many(cfg, store, [carol, "nobody-held" + D])
    assert report.released == {carol: 1} and report.queue_ids == [qid] and report.still_held == []
    wait_for(lambda: target_count(lab, carol, mid) == 1, 5, "carol's copy in her target INBOX")
    # each copy exactly once, in the right place
    for u in legacy_users:
        assert legacy_count(lab, u, mid) == 1 and target_count(lab, u, mid) == 0
    for u in [*local_users, carol]:
        assert target_count(lab, u, mid) == 1 and legacy_count(lab, u, mid) == 0


def _stop_legacy_postfix(lab_dir: Path) -> None:
    pid = proc.load_state(lab_dir)["pids"]["legacy-postfix"]
    proc.stop_group(int(pid))


def test_legacy_down_is_temporary_and_accepted_mail_arrives_when_it_is_back(lab: dict[str, Any], store: Store) -> None:
    """What a sender sees while the legacy server is down:

    - a recipient Postfix verified in the last minutes (address_verify_positive_refresh_time) is accepted
      (250) and the message waits in Postfix's queue, delivered once the legacy server is back;
    - any other recipient gets 450 4.1.1 at RCPT (temporary): the sender keeps the message and retries.
    """
    lab_dir = Path(lab["dir"])
    grace, frank = "grace" + D, "frank" + D
    warm = message_id()  # verifies grace while legacy is up
    assert smtp(lab, [grace], warm)[0][grace][0] == 250
    wait_for(lambda: legacy_count(lab, grace, warm) == 1, what="the first message at grace on legacy")
    _stop_legacy_postfix(lab_dir)
    try:
        mid = message_id()
        replies, data = send(lab["target"]["host"], lab["target"]["smtp"], [grace, "fresh-" + frank], mid)
        assert replies[grace][0] == 250
        code, text = replies["fresh-" + frank]
        assert code == 450 and text.startswith("4.1.1") and "Connection refused" in text
        qid = queue_id(data)
        wait_for(
            lambda: any(m["queue_id"] == qid and m["queue_name"] == "deferred" for m in queue(lab)),
            what="the message deferred while legacy is down",
        )
        assert any("status=deferred" in ln and "Connection refused" in ln for ln in lines(lab, qid, grace))
    finally:
        launcher.lab_restart(lab_dir, "legacy-postfix")
    subprocess.run(["postqueue", "-c", postfix_config(lab), "-i", qid], check=True, timeout=30)
    wait_for(lambda: legacy_count(lab, grace, mid) == 1, 30, "the deferred message at grace on legacy")
