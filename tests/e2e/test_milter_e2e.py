"""The message-log milter end to end (real Postfix, real sidecar), and mail with the milter or the sidecar down.

Decisions tested here:
- milter down, socketmap up (the sidecar runs without its milter): Postfix accepts and routes as usual
  (milter_default_action = accept); the message is simply not logged.
- the whole sidecar down (socketmap too): Postfix cannot route, so it answers 4xx at RCPT (or, for a
  recipient it had already resolved, queues and defers); nothing bounces, nothing is lost, and mail flows
  again once the sidecar is back.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness.e2e_mail import legacy_count, message_id, migrate, postfix_config, queue, send, target_count, wait_for

from sidecar import config
from sidecar.auth import passwords
from sidecar.lab import launcher, target
from sidecar.store.base import MessageRecord, Store

pytestmark = pytest.mark.e2e

D = "@example.test"


LAB = {"prefix": "ap-milter-", "users": 5}  # erin: only the probe test sends to her


def rows(store: Store, recipient: str, mid: str) -> list[MessageRecord]:
    return [r for r in store.message_log(recipient) if r.message_id == mid]


def wait_row(store: Store, recipient: str, mid: str) -> MessageRecord:
    found: list[MessageRecord] = wait_for(lambda: rows(store, recipient, mid), 10, f"a log row for {recipient}")
    assert len(found) == 1
    return found[0]


def test_log_row_carries_headers_and_auto_submitted(lab: dict[str, Any], store: Store) -> None:
    mid = message_id()
    headers = {"Auto-Submitted": "auto-replied (vacation)", "Precedence": "bulk", "List-Id": "<news.example.net>"}
    _, data = send(lab["target"]["host"], lab["target"]["smtp"], ["alice" + D], mid, headers=headers)
    assert data is not None and data[0] == 250
    row = wait_row(store, "alice" + D, mid)
    assert row.auto_submitted == "auto-replied (vacation)"
    assert row.precedence == "bulk" and row.list_id == "<news.example.net>"
    assert row.sender == "someone@outside.test" and row.queue_id == data[1].rsplit(" ", 1)[-1]
    assert row.size > 200 and not row.from_legacy and row.auth_user == ""
    plain = message_id()
    send(lab["target"]["host"], lab["target"]["smtp"], ["alice" + D], plain)
    assert wait_row(store, "alice" + D, plain).auto_submitted == ""


def test_mail_from_the_legacy_hosts_address_is_marked(lab: dict[str, Any], store: Store) -> None:
    """A message relayed from the legacy server (its aliases, forwards, auto-replies) is flagged from_legacy."""
    mid = message_id()
    _, data = send(lab["target"]["host"], lab["target"]["smtp"], ["bob" + D], mid,
                   source=lab["legacy"]["host"], sender="bob" + D)  # fmt: skip
    assert data is not None and data[0] == 250
    row = wait_row(store, "bob" + D, mid)
    assert row.from_legacy and row.client_addr == lab["legacy"]["host"]


def test_submission_records_the_login(lab: dict[str, Any], store: Store) -> None:
    cfg = config.load(lab["config"])
    carol = "carol" + D
    migrate(store, carol)
    store.set_password_hash(carol, passwords.hash_password("carol's new secret", cfg.hash))
    mid = message_id()
    m = f"From: {carol}\r\nTo: bob{D}\r\nMessage-ID: {mid}\r\nSubject: sub\r\n\r\nhi\r\n"
    with smtplib.SMTP(lab["target"]["host"], lab["target"]["submission"], timeout=30) as s:
        s.ehlo("client.e2e.test")
        s.login(carol, "carol's new secret")
        s.sendmail(carol, ["bob" + D], m.encode())
    row = wait_row(store, "bob" + D, mid)
    assert row.auth_user == carol and row.sender == carol


def _sidecar_config(lab: dict[str, Any], **sockets: Any) -> None:
    path = Path(lab["config"])
    cfg = config.load(path)
    for k, v in sockets.items():
        setattr(cfg.sockets, k, v)
    path.write_text(config.render(cfg, redact=False))


def test_milter_down_mail_still_flows_unlogged(lab: dict[str, Any], store: Store) -> None:
    lab_dir = Path(lab["dir"])
    milter = config.load(lab["config"]).sockets.milter
    _sidecar_config(lab, milter="")  # the sidecar without its milter; Postfix still points at the old address
    launcher.lab_restart(lab_dir, "sidecar")
    try:
        mid = message_id()
        replies, data = send(lab["target"]["host"], lab["target"]["smtp"], ["dave" + D], mid)
        assert replies["dave" + D][0] == 250 and data is not None and data[0] == 250, (replies, data)
        wait_for(lambda: legacy_count(lab, "dave" + D, mid) == 1, what="the message at dave on legacy")
        assert rows(store, "dave" + D, mid) == []
    finally:
        _sidecar_config(lab, milter=milter)
        launcher.lab_restart(lab_dir, "sidecar")
    # the lab waits for the sidecar's UNIX sockets, the milter's included (with the group and mode Postfix needs)
    assert milter.startswith("unix:") and Path(milter[len("unix:") :]).is_socket()
    mid = message_id()
    send(lab["target"]["host"], lab["target"]["smtp"], ["dave" + D], mid)
    wait_row(store, "dave" + D, mid)  # logging again


def _milter_child(sidecar_pid: int) -> int | None:
    """The pid of the sidecar's milter process (a child running sidecar.edge.milter), or None."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == sidecar_pid and b"sidecar.edge.milter" in cmdline:
            return int(d.name)
    return None


def test_milter_runs_in_its_own_process_and_comes_back_after_a_crash(lab: dict[str, Any], store: Store) -> None:
    """SIGKILL the milter process: mail still flows meanwhile; the daemon starts it again, with the socket
    mode Postfix needs, and it logs again."""
    import os
    import signal
    import stat as stat_mod

    sidecar_pid = int(launcher.lab_info(Path(lab["dir"]))["pids"]["sidecar"])
    child = wait_for(lambda: _milter_child(sidecar_pid), 15, "the milter process")
    assert child != sidecar_pid
    os.kill(child, signal.SIGKILL)
    mid = message_id()
    replies, data = send(lab["target"]["host"], lab["target"]["smtp"], ["bob" + D], mid)
    assert replies["bob" + D][0] == 250 and data is not None and data[0] == 250
    wait_for(lambda: legacy_count(lab, "bob" + D, mid) == 1, what="the message at bob on legacy")
    again = wait_for(lambda: (c := _milter_child(sidecar_pid)) not in (None, child) and c, 30, "a new milter")
    milter = config.load(lab["config"]).sockets.milter
    sock = Path(milter[len("unix:") :])
    cfg = config.load(lab["config"])

    def listening() -> bool:  # the killed child's socket file stays behind until the new one replaces it
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(sock))
            except OSError:
                return False
        return stat_mod.S_IMODE(sock.stat().st_mode) == cfg.sockets.mode

    # a new interpreter, its imports and its store connection first: on a loaded 2-core machine that took > 15 s
    wait_for(listening, 60, "the new milter listening on its socket, with its mode")
    assert again != child
    mid = message_id()
    send(lab["target"]["host"], lab["target"]["smtp"], ["bob" + D], mid)
    wait_row(store, "bob" + D, mid)  # logging again


def test_sidecar_down_defers_never_bounces(lab: dict[str, Any], store: Store) -> None:
    """Sidecar down: a recipient this smtpd has not resolved yet gets 451 4.3.0 at RCPT (the sender retries);
    one it resolved moments ago (smtpd's resolve cache, Postfix's verify cache) is accepted at RCPT, and its
    message is accepted at DATA too (cleanup's alias map is a file: it needs no sidecar) and waits in the queue
    ("address resolver failure") until the sidecar is back, and up to 30 s more: trivial-rewrite keeps its
    failed lookup that long (measured: the message left 30 s after the restart)."""
    lab_dir = Path(lab["dir"])
    carol, dave = "carol" + D, "dave" + D
    if store.state_of(carol) is None:  # test_submission_records_the_login migrates her too
        migrate(store, carol)
    mid = message_id()
    stack = target.load_target(lab_dir)
    assert stack is not None
    target._stop_component(lab_dir, target.SIDECAR, stack)
    try:
        replies, data = send(lab["target"]["host"], lab["target"]["smtp"], [carol, dave], mid)
        assert all(code in (250, 451) for code, _ in replies.values()), replies  # never a 5xx
        refused = [r for r, (code, text) in replies.items() if code == 451]
        assert all("4.3.0" in replies[r][1] for r in refused)
        assert refused, "with the routing map down at least the never-seen recipient is refused"
        accepted = [r for r in replies if r not in refused]
        # before the alias map was a file, cleanup could not ask it here: 451 4.3.0 at DATA
        assert data is None or data[0] == 250, data
        qid = data[1].rsplit(" ", 1)[-1] if data is not None else ""
        if accepted:
            assert data is not None and data[0] == 250
            wait_for(lambda: any(m["queue_id"] == qid and m["queue_name"] == "deferred" for m in queue(lab)),
                     what="the accepted message deferred")  # fmt: skip
    finally:
        launcher.lab_restart(lab_dir, "sidecar")
    if accepted:
        # Postfix would retry on its own (queue_run_delay); the test asks at once, and again until it is out:
        # the first ask can come while the restarted sidecar's socketmap workers are still starting
        def delivered() -> bool:
            if not any(m["queue_id"] == qid for m in queue(lab)):
                return True
            subprocess.run(["postqueue", "-c", postfix_config(lab), "-i", qid], check=False, timeout=30)
            return False

        wait_for(delivered, 60, "the queued message out of the queue", interval=1)

    # the sender retries the refused recipients once the sidecar is back
    def retried() -> bool:
        replies, data = send(lab["target"]["host"], lab["target"]["smtp"], refused, mid)
        return data is not None and data[0] == 250 and all(c == 250 for c, _ in replies.values())

    wait_for(retried, 60, "the retried message accepted")
    wait_for(lambda: target_count(lab, carol, mid) == 1, what="carol's copy on the target")
    wait_for(lambda: legacy_count(lab, dave, mid) == 1, what="dave's copy on legacy")
    assert target_count(lab, carol, mid) == 1 and legacy_count(lab, dave, mid) == 1  # once each


def test_a_verification_probe_made_while_the_sidecar_is_down_is_not_lost(lab: dict[str, Any]) -> None:
    """Postfix's verify service probes a new recipient once, then answers "in progress" (450 at RCPT) until the
    probe reports or is 1000 s old. A probe made while the sidecar is down must still report, so the address is
    probed again and accepted soon after the sidecar is back, not 17 minutes later. (With the aliases on the
    socketmap, cleanup refused the probe and it vanished: test_conservation.py once waited 6+ minutes.)"""
    from harness import postfix_verify

    lab_dir = Path(lab["dir"])
    stack = target.load_target(lab_dir)
    assert stack is not None
    fresh = "erin" + D  # an address the verify cache has never seen: no other test here sends to her
    target._stop_component(lab_dir, target.SIDECAR, stack)
    try:
        status, text = postfix_verify.query(stack.queue_directory, fresh)
        assert status == postfix_verify.TODO, text  # the probe is posted now, with the sidecar down
        # the probe reached the queue and reported its deferral (it cannot be routed without the sidecar)
        deferred = wait_for(lambda: postfix_verify.query(stack.queue_directory, fresh)[0] == postfix_verify.DEFER,
                            60, "the probe's deferral reported to the verify service", interval=0.5)  # fmt: skip
        assert deferred
    finally:
        launcher.lab_restart(lab_dir, "sidecar")

    # with the sidecar back, the verify service probes again (address_verify_negative_refresh_time, 30 s)
    def accepted() -> bool:
        replies, data = send(lab["target"]["host"], lab["target"]["smtp"], [fresh], message_id())
        return replies[fresh][0] == 250 and data is not None and data[0] == 250

    wait_for(accepted, 120, f"{fresh} accepted at RCPT once the sidecar is back", interval=5)
