"""The socketmap server on a real UNIX socket, asked by Postfix's own client (`postmap -q`) and by raw clients
that pipeline, break framing, send oversize requests or go silent."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from harness.fakes import FakeStore
from harness.socketmap_server import STATES, Running, SharedFlagsStore, ask, is_closed, read_replies
from harness.waiting import wait_for

from sidecar.auth.routing import RoutingPolicy
from sidecar.config import Config
from sidecar.edge.socketmap import parse_address, start_socketmap_server
from sidecar.edge.socketmap_worker import READY, start_socketmap_workers
from sidecar.states import State
from sidecar.store.base import Store
from sidecar.wire import netstring

LMTP = "lmtp:unix:private/dovecot-lmtp"
RELAY = "legacy:[192.0.2.25]:25"
HOLD = "retry:4.3.2 mailbox migration in progress"


# --- Postfix's own client -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "map_name", "expected"),
    [
        ("ann@example.org", "transport", LMTP),
        ("bob@example.org", "transport", HOLD),
        ("bob@example.org", "verify", RELAY),
        ("cy@example.org", "transport", RELAY),
        ("nobody-yet@example.org", "transport", RELAY),
        ("Ann+tag@Example.ORG", "transport", LMTP),
    ],
)
def test_postmap_gets_the_route(serve: Callable[..., Running], key: str, map_name: str, expected: str) -> None:
    r = serve()
    out = r.postmap(key, map_name)
    assert (out.returncode, out.stdout.strip()) == (0, expected), out.stderr


def test_postmap_notfound_for_other_domains(serve: Callable[..., Running]) -> None:
    out = serve().postmap("someone@elsewhere.test")
    assert (out.returncode, out.stdout) == (1, "")  # postmap: exit 1 = not found
    assert "error" not in out.stderr


def test_postmap_store_down_is_temporary(serve: Callable[..., Running]) -> None:
    r = serve()
    r.store.down = True
    out = r.postmap("ann@example.org")
    assert out.returncode != 0
    assert "temporary error" in out.stderr
    r.store.down = False
    assert r.postmap("ann@example.org").stdout.strip() == LMTP  # and it recovers


def test_postmap_many_keys_on_one_connection(serve: Callable[..., Running]) -> None:
    r = serve()
    keys = ["ann@example.org", "bob@example.org", "x@elsewhere.test", "cy@example.org"] * 50
    out = subprocess.run(
        ["postmap", "-c", str(r.tmp / "pf"), "-q", "-", f"socketmap:unix:{r.path}:transport"],
        input="\n".join(keys) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    expected = [f"{k}\t{v}" for k, v in zip(keys, [LMTP, HOLD, None, RELAY] * 50, strict=True) if v]
    assert out.stdout.splitlines() == expected, out.stderr
    assert r.server.stats.requests == len(keys)


# --- raw clients ----------------------------------------------------------------------------------------------
def test_pipelined_replies_in_order(serve: Callable[..., Running]) -> None:
    r = serve()
    keys = ["ann@example.org", "x@elsewhere.test", "bob@example.org", "cy@example.org", "bad"] * 40
    replies = ask(r.connect(), *[b"transport " + k.encode() for k in keys])
    expected = {
        "ann@example.org": b"OK " + LMTP.encode(),
        "x@elsewhere.test": b"NOTFOUND ",
        "bob@example.org": b"OK " + HOLD.encode(),
        "cy@example.org": b"OK " + RELAY.encode(),
        "bad": b"NOTFOUND ",
    }
    assert replies == [expected[k] for k in keys]


def test_pipelined_order_kept_with_cache_hits_behind_a_miss(serve: Callable[..., Running]) -> None:
    r = serve(cache_ttl=30)
    s = r.connect()
    assert ask(s, b"transport ann@example.org") == [b"OK " + LMTP.encode()]  # now cached
    r.store.block = threading.Event()  # the next store read waits
    s.sendall(netstring.encode(b"transport cy@example.org") + netstring.encode(b"transport ann@example.org"))
    time.sleep(0.3)
    r.store.block.set()
    assert read_replies(s, 2) == [b"OK " + RELAY.encode(), b"OK " + LMTP.encode()]
    assert r.server.stats.cache_hits == 1


def test_request_split_across_writes(serve: Callable[..., Running]) -> None:
    s = serve().connect()
    wire = netstring.encode(b"transport ann@example.org")
    for byte in wire[:-1]:
        s.sendall(bytes([byte]))
    time.sleep(0.05)
    s.sendall(wire[-1:])
    assert read_replies(s, 1) == [b"OK " + LMTP.encode()]


@pytest.mark.parametrize(
    "garbage",
    [b"hello\n", b"GET / HTTP/1.0\r\n\r\n", b"05:hello,", b"5:helloX", b"99999999:", b"3000:"],
    ids=["line", "http", "leading-zero", "no-comma", "huge-prefix", "over-cap"],
)
def test_broken_framing_closes_connection_server_keeps_serving(serve: Callable[..., Running], garbage: bytes) -> None:
    r = serve()
    bad = r.connect()
    bad.sendall(garbage)
    assert is_closed(bad)
    assert r.server.stats.malformed == 1
    assert ask(r.connect(), b"transport ann@example.org") == [b"OK " + LMTP.encode()]
    assert r.postmap("ann@example.org").stdout.strip() == LMTP


def test_good_requests_before_garbage_are_answered(serve: Callable[..., Running]) -> None:
    s = serve().connect()
    s.sendall(netstring.encode(b"transport ann@example.org") + b"junk")
    assert read_replies(s, 1) == [b"OK " + LMTP.encode()]
    assert is_closed(s)


def test_oversize_request_refused_at_its_prefix(serve: Callable[..., Running]) -> None:
    r = serve(max_request=100)
    s = r.connect()
    s.sendall(b"101:")  # nothing else: refused on the declared length alone
    assert is_closed(s)


@pytest.mark.parametrize("payload", [b"transport", b"transport\xff@example.org", b" ann@example.org"])
def test_malformed_request_is_perm_connection_stays(serve: Callable[..., Running], payload: bytes) -> None:
    s = serve().connect()
    assert ask(s, payload)[0].startswith(b"PERM ")
    assert ask(s, b"transport ann@example.org") == [b"OK " + LMTP.encode()]


def test_idle_connection_closed(serve: Callable[..., Running]) -> None:
    r = serve(idle_timeout=0.3)
    idle, partial = r.connect(), r.connect()
    partial.sendall(b"30:transport ann")  # a request that never completes
    t0 = time.monotonic()
    assert is_closed(idle)
    assert is_closed(partial)
    assert time.monotonic() - t0 < 3
    assert ask(r.connect(), b"transport ann@example.org") == [b"OK " + LMTP.encode()]


def test_stuck_store_answers_timeout_then_recovers(serve: Callable[..., Running]) -> None:
    r = serve(request_timeout=0.4)
    r.store.block = threading.Event()
    s = r.connect()
    t0 = time.monotonic()
    assert (
        ask(s, b"transport ann@example.org", b"transport cy@example.org") == [b"TIMEOUT state store not answering"] * 2
    )
    assert time.monotonic() - t0 < 3
    # while the lookup is still stuck, new requests are answered at once instead of queueing
    assert ask(r.connect(), b"verify ann@example.org") == [b"TIMEOUT state store not answering"]
    r.store.block.set()
    r.store.block = None
    wait_for(lambda: ask(r.connect(), b"transport ann@example.org") == [b"OK " + LMTP.encode()], 5,
             "the store to answer again")  # fmt: skip


def test_many_concurrent_clients(serve: Callable[..., Running]) -> None:
    r = serve()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            s = r.connect()
            for _ in range(50):
                assert ask(s, b"transport bob@example.org") == [b"OK " + HOLD.encode()]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert r.server.stats.requests == 1000


def test_close_removes_socket_file(serve: Callable[..., Running]) -> None:
    r = serve()
    assert Path(r.path).is_socket()
    r.stop()
    r.stop = lambda: None  # type: ignore[method-assign]
    assert not Path(r.path).exists()


def test_inet_listener() -> None:
    async def run() -> bytes:
        cfg = Config()
        cfg.mail.domains = ["example.org"]
        policy = RoutingPolicy(cfg, cast(Store, FakeStore(dict(STATES))))
        server = await start_socketmap_server("inet:127.0.0.1:0", policy)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(netstring.encode(b"transport ann@example.org"))
        data = await reader.readuntil(b",")
        writer.close()
        server.close()
        await server.wait_closed()
        return data

    assert asyncio.run(run()) == netstring.encode(b"OK " + LMTP.encode())


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("unix:/run/autoport/sm.sock", ("unix", "/run/autoport/sm.sock", 0)),
        ("/run/autoport/sm.sock", ("unix", "/run/autoport/sm.sock", 0)),
        ("inet:127.0.0.1:10027", ("inet", "127.0.0.1", 10027)),
        ("inet:[::1]:10027", ("inet", "::1", 10027)),
    ],
)
def test_parse_address(address: str, parsed: tuple[str, str, int]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize("address", ["unix:relative", "inet:host", "inet:host:99999", "tcp:1.2.3.4:5"])
def test_parse_address_refuses(address: str) -> None:
    with pytest.raises(ValueError, match="socketmap address"):
        parse_address(address)


# --- the worker processes (sidecar.edge.socketmap_worker) -------------------------------------------------------
def test_workers_inet_listener(tmp_path: Path) -> None:
    r = Running(tmp_path, SharedFlagsStore(dict(STATES), tmp_path / "flags"), "workers")
    try:
        server = r.call(start_socketmap_workers("inet:127.0.0.1:0", r.policy, workers=1))
        try:
            with socket.create_connection(("127.0.0.1", server.sockets[0].getsockname()[1]), timeout=5) as s:
                assert ask(s, b"transport ann@example.org") == [b"OK " + LMTP.encode()]
        finally:
            server.close()
    finally:
        r.stop()


def test_killed_worker_is_restarted_and_no_lookup_gets_a_wrong_route(tmp_path: Path) -> None:
    r = Running(tmp_path, SharedFlagsStore(dict(STATES), tmp_path / "flags"), "workers", workers=2)
    answers: list[bytes] = []
    stop = threading.Event()

    def client() -> None:  # new connections all the while: each gets the right route, or a broken connection
        while not stop.is_set():
            try:
                answers.extend(ask(r.connect(), b"transport bob@example.org"))
            except (ConnectionError, OSError):
                answers.append(b"broken")

    try:
        before = list(r.server.pids)
        t = threading.Thread(target=client)
        t.start()
        os.kill(before[0], signal.SIGKILL)
        wait_for(lambda: r.server.pids[0] not in (0, before[0]), 10, "the worker to be forked again")
        time.sleep(0.3)
        stop.set()
        t.join(10)
        assert r.server.stats.restarts == 1
        assert r.server.pids[1] == before[1]  # the other worker was left alone
        assert set(answers) <= {b"OK " + HOLD.encode(), b"broken"} and b"OK " + HOLD.encode() in answers
        assert r.postmap("bob@example.org").stdout.strip() == HOLD
    finally:
        stop.set()
        r.stop()
    assert all(r.server.pids) and r.server.supervisor_pid
    for pid in [*r.server.pids, r.server.supervisor_pid]:  # stopped: no worker and no supervisor left behind
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


class _LockedStore(SharedFlagsStore):
    """Every state read takes one process-wide lock, as SQLite's mutexes are taken inside the library."""

    mutex = threading.Lock()

    def state_of(self, address: str) -> State | None:
        with self.mutex:
            return super().state_of(address)


def test_a_worker_forked_again_while_a_daemon_thread_holds_a_lock_serves(tmp_path: Path) -> None:
    """Workers are forked by a supervisor that the daemon forked while it had one thread, never by the daemon:
    a lock another daemon thread holds when a worker dies and is forked again is not held in the new worker.
    (Forked from the daemon, as before, the new worker hung on its first read until the READY watchdog.)"""
    store = _LockedStore(dict(STATES), tmp_path / "flags")
    r = Running(tmp_path, store, "workers", workers=1)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:  # a daemon thread inside the store library
        with store.mutex:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    try:
        first = r.server.pids[0]
        assert _ppid(first) == r.server.supervisor_pid != os.getpid()
        holder.start()
        assert held.wait(5)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: r.server.pids[0] not in (0, first), 10, "the worker to be forked again")
        # ready (its first store read done) well within READY_TIMEOUT, and answering, while the lock is held here
        wait_for(lambda: r.server.stats.view[READY] == 1, 3, "the new worker to read the store")
        assert r.postmap("ann@example.org").stdout.strip() == LMTP
        assert r.server.stats.restarts == 1 and r.server.supervisor_restarts == 0
    finally:
        release.set()
        holder.join(5) if holder.is_alive() else None
        r.stop()


def test_a_killed_supervisor_is_replaced_and_its_workers_go_with_it(tmp_path: Path) -> None:
    r = Running(tmp_path, SharedFlagsStore(dict(STATES), tmp_path / "flags"), "workers", workers=2)
    try:
        old_supervisor, old_workers = r.server.supervisor_pid, list(r.server.pids)
        os.kill(old_supervisor, signal.SIGKILL)
        wait_for(lambda: r.server.supervisor_pid != old_supervisor, 10, "a new supervisor")
        wait_for(lambda: not set(r.server.pids) & set(old_workers) and all(r.server.pids), 10, "new workers")
        for pid in old_workers:  # their death signal is SIGKILL: none keeps the listening socket
            wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists()
                     or "zombie" in Path(f"/proc/{pid}/status").read_text(), 5, f"old worker {pid} to end")  # fmt: skip
        assert {_ppid(pid) for pid in r.server.pids} == {r.server.supervisor_pid}
        wait_for(lambda: r.server.stats.view[READY] == 1, 10, "the new workers to read the store")
        assert r.postmap("bob@example.org").stdout.strip() == HOLD
        assert r.server.supervisor_restarts == 1 and r.server.stats.restarts == 2  # both workers started again
    finally:
        r.stop()


def test_a_stuck_lookup_does_not_stop_the_worker(tmp_path: Path) -> None:
    r = Running(tmp_path, SharedFlagsStore(dict(STATES), tmp_path / "flags"), "workers", workers=1,
                request_timeout=0.3)  # fmt: skip
    try:
        s = r.connect()
        r.store.block = threading.Event()
        assert ask(s, b"transport ann@example.org") == [b"TIMEOUT state store not answering"]
        r.store.block = None
        assert ask(s, b"transport ann@example.org") == [b"OK " + LMTP.encode()]  # same worker, same connection
        assert r.server.stats.timeouts == 1 and r.server.stats.restarts == 0
    finally:
        r.stop()


def test_a_worker_stuck_before_its_first_store_read_is_replaced(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A worker forked while another daemon thread held a database lock hangs on its first read (the lock is
    never released in the child): it is killed and forked again, and the new one serves."""
    import sidecar.edge.socketmap_worker as smw

    monkeypatch.setattr(smw, "READY_TIMEOUT", 0.5)
    store = SharedFlagsStore(dict(STATES), tmp_path / "flags")
    store.block = threading.Event()  # the warm-up read hangs (10 s) as on an inherited lock
    r = Running(tmp_path, store, "workers", workers=1)
    try:
        wait_for(lambda: r.server.pids[0], 5, "the supervisor to fork a worker")
        first = r.server.pids[0]
        wait_for(lambda: r.server.stats.restarts >= 1, 10, "the stuck worker to be killed and forked again")
        assert not r.server.stats.view[smw.READY] and first not in r.server.pids
        # twice in a row: that supervisor's image may hold the lock, so the daemon forks a new supervisor
        wait_for(lambda: r.server.supervisor_restarts >= 1, 10, "the supervisor to be replaced")
        store.block = None
        wait_for(lambda: r.server.stats.view[smw.READY] == 1, 10, "a worker that read the store")
        assert r.postmap("ann@example.org").stdout.strip() == LMTP
    finally:
        store.block = None
        r.stop()


def test_workers_are_ready_after_one_store_read(tmp_path: Path) -> None:
    import sidecar.edge.socketmap_worker as smw

    r = Running(tmp_path, SharedFlagsStore(dict(STATES), tmp_path / "flags"), "workers", workers=2)
    try:
        wait_for(lambda: r.server.stats.view[smw.READY] + r.server.stats.view[len(smw.FIELDS) + smw.READY] == 2, 10,
                 "both workers ready")  # fmt: skip
        assert r.server.stats.restarts == 0
    finally:
        r.stop()
