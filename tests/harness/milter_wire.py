"""The milter driven two ways: through pymilter's test context (Harness, over the fake store), and on the wire,
run_milter() in a subprocess (SERVER; libmilter runs once per process) spoken to with milter packets.

Used by the milter unit tests and the hostile-input tests; conftest's `milter_server` fixture starts SERVER.
"""

from __future__ import annotations

import socket
import struct
import textwrap
from typing import cast

import Milter
from Milter.testctx import TestCtx as MilterTestCtx

from harness.fakes import FakeStore
from sidecar.config import Config
from sidecar.edge import milter as m
from sidecar.store.base import Store

LEGACY = "192.0.2.25"


class Harness:
    def __init__(self, store: FakeStore, *, maxsize: int = 100) -> None:
        cfg = Config()
        cfg.mail.domains = ["example.org"]
        cfg.legacy.host = LEGACY
        self.store = store
        self.stats = m.MilterStats()
        self.writer = m.RecordWriter(cast(Store, store), self.stats, maxsize=maxsize)
        self.writer.start()
        shared = m._Shared(cfg, self.writer, self.stats)
        self.saved_factory = Milter.factory
        Milter.factory = lambda: m.MessageLogMilter(shared)

    def close(self) -> None:
        self.writer.stop()
        Milter.factory = self.saved_factory

    def session(self, ip: str = "198.51.100.7") -> MilterTestCtx:
        ctx = MilterTestCtx()
        assert ctx._connect(host="client.example", helo="client.example", ip=ip) == Milter.CONTINUE
        return ctx

    def flush(self) -> None:
        self.writer.stop()


SERVER = textwrap.dedent(
    """
    import json, signal, sys, threading
    from sidecar.config import Config
    from sidecar.edge.milter import run_milter

    class Store:
        def log_messages(self, records):
            for r in records:
                print(json.dumps(r.__dict__), flush=True)

    cfg = Config()
    cfg.sockets.milter = sys.argv[1]
    cfg.legacy.host = "192.0.2.25"
    stop = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *a: stop.set())
    result = []
    # as in the daemon: not in the main thread, whose Python signal handlers cannot run inside libmilter
    t = threading.Thread(target=lambda: result.append(run_milter(cfg, Store(), stop)))
    t.start()
    while t.is_alive():
        t.join(0.1)
    print("stats", json.dumps(result[0].snapshot()), flush=True)
    """
)


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def read_packet(s: socket.socket) -> tuple[bytes, bytes]:
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        assert chunk, "milter closed the connection"
        head += chunk
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        assert chunk
        body += chunk
    return body[:1], body[1:]


def macros(stage: bytes, **values: str) -> bytes:
    data = b"".join(f"{k}\0{v}\0".encode() for k, v in values.items())
    return packet(b"D", stage + data)
