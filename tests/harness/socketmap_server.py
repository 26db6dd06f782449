"""A socketmap server (RoutingPolicy over the fake store) on a real UNIX socket in a thread, and raw clients.

Used by the socketmap unit tests and the hostile-input tests; conftest's `serve` fixture starts them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, cast

from harness.fakes import FakeStore
from sidecar.auth.routing import RoutingPolicy
from sidecar.config import Config
from sidecar.edge.socketmap import SocketmapServer, start_socketmap_server
from sidecar.states import State
from sidecar.store.base import Store
from sidecar.wire import netstring

STATES = {"ann@example.org": State.MIGRATED, "bob@example.org": State.CUTOVER, "cy@example.org": State.COPYING}


class Running:
    def __init__(self, tmp: Path, store: FakeStore, **kw: Any) -> None:
        self.tmp = tmp
        self.path = str(tmp / "sm.sock")
        self.store = store
        cfg = Config()
        cfg.mail.domains = ["example.org"]
        cfg.legacy.host = "192.0.2.25"
        self.policy = RoutingPolicy(cfg, cast(Store, store))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: SocketmapServer = self.call(start_socketmap_server(f"unix:{self.path}", self.policy, **kw))
        self.clients: list[socket.socket] = []
        (tmp / "pf").mkdir(exist_ok=True)
        main_cf = tmp / "pf" / "main.cf"
        main_cf.write_text("")
        # Postfix re-reads a config file whose mtime is this second (0.3 s sleeps): make it old
        os.utime(main_cf, (time.time() - 60, time.time() - 60))

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        for c in self.clients:
            c.close()

        async def _stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        self.call(_stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def postmap(self, key: str, map_name: str = "transport") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postmap", "-c", str(self.tmp / "pf"), "-q", key, f"socketmap:unix:{self.path}:{map_name}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.clients.append(s)
        s.settimeout(5)
        s.connect(self.path)
        return s


def ask(s: socket.socket, *requests: bytes) -> list[bytes]:
    """Send all requests in one write (pipelined), read exactly as many replies."""
    s.sendall(b"".join(netstring.encode(r) for r in requests))
    return read_replies(s, len(requests))


def read_replies(s: socket.socket, n: int) -> list[bytes]:
    dec = netstring.Decoder()
    got: list[bytes] = []
    while len(got) < n:
        data = s.recv(65536)
        if not data:
            raise ConnectionError(f"closed after {len(got)} replies")
        got += dec.feed(data)
    return got


def is_closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
