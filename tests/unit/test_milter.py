"""The message-log milter.

Record building is driven through pymilter's own test context (Milter.testctx.TestCtx, in 1.0.5), which calls
our callbacks the way libmilter does. The wire test runs run_milter() in a subprocess (libmilter runs once per
process) and speaks the milter protocol to it with the macros Postfix sends. Postfix itself in front of the
milter is the lead's end-to-end suite.
"""

from __future__ import annotations

import io
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import Milter
import pytest
from harness.fakes import FakeStore
from harness.milter_wire import Harness, macros, packet, read_packet
from Milter.testctx import TestCtx as MilterTestCtx

from sidecar.edge import milter as m
from sidecar.store.base import MessageRecord

LEGACY = "192.0.2.25"


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(FakeStore())
    yield h
    h.close()


MESSAGE = (
    b"From: Ann <ann@example.net>\r\n"
    b"To: many\r\n"
    b"Message-ID: <abc.123@example.net>\r\n"
    b"Auto-Submitted: auto-replied\r\n"
    b"Precedence: bulk\r\n"
    b"List-Id: Friends <friends.example.net>\r\n"
    b"Message-ID: <second@ignored>\r\n"
    b"\r\n"
)
BODY = b"hello\r\n" * 100


def send(
    ctx: MilterTestCtx, sender: str, rcpts: list[tuple[str, str, str]], *, auth: str = "", queue_id: str = "4XyZ1"
):
    """Drive one message: per recipient (address, {rcpt_mailer}, {rcpt_host})."""
    ctx._setsymval("{auth_authen}", auth or None)
    # negotiated as no-reply (SMFIP_NR_*): Postfix does not wait for these answers
    assert ctx._envfrom(f"<{sender}>") == Milter.NOREPLY
    for rcpt, mailer, host in rcpts:
        ctx._setsymval("{rcpt_mailer}", mailer)
        ctx._setsymval("{rcpt_host}", host)
        assert ctx._envrcpt(f"<{rcpt}>") == Milter.NOREPLY
    assert ctx._data() == Milter.CONTINUE
    for line in MESSAGE.split(b"\r\n")[:-2]:
        name, _, value = line.decode().partition(": ")
        assert ctx._header(name, value) == Milter.NOREPLY
    assert ctx._eoh() == Milter.CONTINUE
    assert ctx._feed_body(io.BytesIO(BODY)) == Milter.NOREPLY
    ctx._setsymval("i", queue_id)
    return ctx._eom()


def test_one_record_per_recipient_with_its_route(harness: Harness) -> None:
    ctx = harness.session()
    rc = send(
        ctx,
        "ann@example.net",
        [
            ("Bob@Example.org", "legacy", f"[{LEGACY}]:25"),
            ("cy@example.org", "lmtp", "private/dovecot-lmtp"),
            ("dee@example.org", "retry", "4.3.2 mailbox migration in progress"),
        ],
        auth="ann",
    )
    assert rc == Milter.ACCEPT
    harness.flush()
    rows = harness.store.rows
    assert [(r.recipient, r.route) for r in rows] == [
        ("bob@example.org", f"legacy:[{LEGACY}]:25"),
        ("cy@example.org", "lmtp:private/dovecot-lmtp"),
        ("dee@example.org", "retry"),
    ]
    r = rows[0]
    assert (r.queue_id, r.sender, r.message_id) == ("4XyZ1", "ann@example.net", "<abc.123@example.net>")
    assert (r.auto_submitted, r.precedence, r.list_id) == ("auto-replied", "bulk", "Friends <friends.example.net>")
    assert (r.client_addr, r.auth_user, r.from_legacy) == ("198.51.100.7", "ann", False)
    assert r.size == len(MESSAGE) + len(BODY)
    assert r.at > time.time() - 60
    assert harness.stats.snapshot() == {"messages": 1, "records": 3, "dropped": 0, "errors": 0}
    assert harness.store.calls == 1  # one batch


def test_from_legacy_and_null_sender(harness: Harness) -> None:
    ctx = harness.session(ip=LEGACY)
    send(ctx, "", [("bob@example.org", "lmtp", "private/dovecot-lmtp")])
    harness.flush()
    (r,) = harness.store.rows
    assert (r.from_legacy, r.sender, r.client_addr, r.auth_user) == (True, "", LEGACY, "")


def test_two_messages_on_one_connection_do_not_mix(harness: Harness) -> None:
    ctx = harness.session()
    send(ctx, "a@example.net", [("x@example.org", "lmtp", "h")], queue_id="Q1")
    ctx._setsymval("{auth_authen}", None)
    assert ctx._envfrom("<b@example.net>") == Milter.NOREPLY
    ctx._setsymval("{rcpt_mailer}", "legacy")
    ctx._setsymval("{rcpt_host}", "[h]:25")
    ctx._envrcpt("<y@example.org>")
    assert ctx._data() == Milter.CONTINUE
    ctx._setsymval("i", "Q2")
    assert ctx._eom() == Milter.ACCEPT  # no headers, no body this time
    harness.flush()
    a, b = harness.store.rows
    assert (a.queue_id, a.recipient, a.message_id) == ("Q1", "x@example.org", "<abc.123@example.net>")
    assert (b.queue_id, b.recipient, b.message_id, b.size) == ("Q2", "y@example.org", "", 0)


def test_aborted_message_is_not_recorded(harness: Harness) -> None:
    ctx = harness.session()
    ctx._envfrom("<a@example.net>")
    ctx._envrcpt("<x@example.org>")
    ctx._priv.abort()
    send(ctx, "b@example.net", [("y@example.org", "lmtp", "h")])
    harness.flush()
    assert [r.recipient for r in harness.store.rows] == ["y@example.org"]


def test_store_failure_never_stops_mail() -> None:
    h = Harness(FakeStore(fail=True))
    try:
        ctx = h.session()
        assert send(ctx, "a@example.net", [("x@example.org", "lmtp", "h"), ("y@example.org", "lmtp", "h")]) == (
            Milter.ACCEPT
        )
        h.flush()
        assert h.stats.snapshot() == {"messages": 1, "records": 0, "dropped": 2, "errors": 0}
    finally:
        h.close()


def test_slow_store_never_stalls_and_full_queue_drops() -> None:
    block = threading.Event()
    h = Harness(FakeStore(block=block), maxsize=3)
    try:
        ctx = h.session()
        t0 = time.monotonic()
        for i in range(5):  # 1 taken by the (blocked) writer, 3 queued, the rest dropped
            assert send(ctx, "a@example.net", [(f"r{i}@example.org", "lmtp", "h")], queue_id=f"Q{i}") == (Milter.ACCEPT)
            time.sleep(0.05)
        assert time.monotonic() - t0 < 2  # eom never waited for the store
        block.set()
        h.flush()
        snap = h.stats.snapshot()
        assert snap["messages"] == 5
        assert snap["records"] + snap["dropped"] == 5
        assert snap["dropped"] >= 1
        assert len(h.store.rows) == snap["records"]
    finally:
        h.close()


def test_fault_in_callback_lets_mail_through(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Any) -> list[MessageRecord]:
        raise KeyError("bug")

    monkeypatch.setattr(m.MessageLogMilter, "_records", broken)
    ctx = harness.session()
    assert send(ctx, "a@example.net", [("x@example.org", "lmtp", "h")]) == Milter.ACCEPT
    snap = harness.stats.snapshot()
    assert (snap["errors"], snap["dropped"]) == (1, 1)


@pytest.mark.parametrize(
    ("postfix", "libmilter"),
    [
        ("inet:127.0.0.1:8891", "inet:8891@127.0.0.1"),
        ("inet:localhost:8891", "inet:8891@localhost"),
        ("inet:[::1]:8891", "inet6:8891@::1"),
        ("unix:/run/autoport/milter.sock", "unix:/run/autoport/milter.sock"),
        ("/run/autoport/milter.sock", "unix:/run/autoport/milter.sock"),
    ],
)
def test_libmilter_address(postfix: str, libmilter: str) -> None:
    assert m.libmilter_address(postfix) == libmilter


@pytest.mark.parametrize("bad", ["inet:8891", "inet:host:0", "unix:relative", "tcp:1.2.3.4:5", ""])
def test_libmilter_address_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="milter address"):
        m.libmilter_address(bad)


# --- the real libmilter on a real socket -------------------------------------------------------------------------
def test_real_libmilter_conversation(milter_server: tuple[str, subprocess.Popen[str]]) -> None:
    path, proc = milter_server
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(packet(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)))
        cmd, data = read_packet(s)
        assert cmd == b"O"
        proto = struct.unpack(">III", data[:12])[2]
        # what Postfix is told: no HELO, DATA, end-of-header or unknown-command events at all, and no reply to
        # wait for after MAIL, RCPT, each header and each body chunk; connect and the end of message answer
        skipped = Milter.P_NOHELO | Milter.P_NODATA | Milter.P_NOEOH | Milter.P_NOUNKNOWN
        noreply = Milter.P_NR_MAIL | Milter.P_NR_RCPT | Milter.P_NR_HDR | Milter.P_NR_BODY
        assert proto & (skipped | noreply) == skipped | noreply
        wanted = Milter.P_NOCONNECT | Milter.P_NOMAIL | Milter.P_NORCPT | Milter.P_NOHDRS | Milter.P_NOBODY
        assert proto & (wanted | Milter.P_NR_CONN) == 0

        def step(*packets: bytes, expect: bytes = b"c") -> None:
            s.sendall(b"".join(packets))
            assert read_packet(s)[0] == expect

        step(macros(b"C", j="mx.example.org"), packet(b"C", b"[192.0.2.25]\x004\x00\x19" + b"192.0.2.25\0"))
        unanswered = [macros(b"M", **{"{auth_authen}": "", "{mail_addr}": "ann@example.net"}),
                      packet(b"M", b"<ann@example.net>\0")]  # fmt: skip
        for rcpt, mailer, host in [
            ("bob@example.org", "lmtp", "private/dovecot-lmtp"),
            ("cy@example.org", "legacy", "[192.0.2.25]:25"),
        ]:
            unanswered += [macros(b"R", **{"{rcpt_mailer}": mailer, "{rcpt_host}": host}),
                           packet(b"R", f"<{rcpt}>\0".encode())]  # fmt: skip
        unanswered += [packet(b"L", b"Message-ID\0<m1@example.net>\0"),
                       packet(b"L", b"Auto-Submitted\0auto-generated\0"), packet(b"B", b"hello\r\n")]  # fmt: skip
        # everything up to the end of the message in one go: the first answer back is the final accept
        step(*unanswered, macros(b"E", i="3F2A1"), packet(b"E"), expect=b"a")
        s.sendall(packet(b"Q"))
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    import json

    lines = out.splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    assert [(r["recipient"], r["route"]) for r in rows] == [
        ("bob@example.org", "lmtp:private/dovecot-lmtp"),
        ("cy@example.org", "legacy:[192.0.2.25]:25"),
    ]
    assert {(r["queue_id"], r["message_id"], r["auto_submitted"], r["from_legacy"]) for r in rows} == {
        ("3F2A1", "<m1@example.net>", "auto-generated", True)
    }
    assert lines[-1].startswith("stats ")
    assert json.loads(lines[-1][6:]) == {"messages": 1, "records": 2, "dropped": 0, "errors": 0}


def test_a_killed_milters_socket_is_removed_before_the_new_one_is_secured(tmp_path: Any) -> None:
    """The child gives its socket Postfix's mode as soon as the file is there: a predecessor's socket left at the
    path must go first, or the child secures that one and the socket libmilter then creates keeps 0755."""
    path = str(tmp_path / "milter.sock")
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)  # what SIGKILL leaves behind: the file, no listener
    m.remove_stale_socket(path)
    assert not (tmp_path / "milter.sock").exists()
    m.remove_stale_socket(path)  # nothing there: fine
    (tmp_path / "milter.sock").write_text("not a socket")
    m.remove_stale_socket(path)
    assert (tmp_path / "milter.sock").read_text() == "not a socket"
    m.remove_stale_socket("")  # an inet: milter has no path
