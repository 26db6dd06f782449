"""A socketmap server (RoutingPolicy over the fake store) on a real UNIX socket, and raw clients.

Two servers give the same answers: "asyncio" (sidecar.edge.socketmap, in a thread here) and "workers"
(sidecar.edge.socketmap_worker: forked processes; the fake store's down/block flags are files so that the
forked workers see them). Used by the socketmap unit tests and the hostile-input tests; conftest's `serve`
fixture starts them, once per server.
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
from sidecar.edge.socketmap import start_socketmap_server
from sidecar.edge.socketmap_worker import FIELDS, READY, start_socketmap_workers
from sidecar.states import State
from sidecar.store.base import Store
from sidecar.wire import netstring

STATES = {"ann@example.org": State.MIGRATED, "bob@example.org": State.CUTOVER, "cy@example.org": State.COPYING}
KINDS = ("asyncio", "workers")


class _FileBlock:
    """FakeStore.block across processes: lookups wait while the file exists; set() removes it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.path.exists()

    def set(self) -> None:
        self.path.unlink(missing_ok=True)


class SharedFlagsStore(FakeStore):
    """A FakeStore whose `down` and `block` are files, so forked socketmap workers see them change."""

    def __init__(self, states: dict[str, State], flags: Path) -> None:
        self.flags = flags
        flags.mkdir(parents=True, exist_ok=True)
        super().__init__(states)

    @property  # type: ignore[override]
    def down(self) -> bool:
        return (self.flags / "down").exists()

    @down.setter
    def down(self, value: bool) -> None:
        if value:
            (self.flags / "down").touch()
        else:
            (self.flags / "down").unlink(missing_ok=True)

    @property  # type: ignore[override]
    def block(self) -> _FileBlock | None:
        path = self.flags / "block"
        return _FileBlock(path) if path.exists() else None

    @block.setter
    def block(self, value: object) -> None:
        """Any event blocks (the tests' threading.Event()); None releases. block.set() releases too."""
        if value is None:
            (self.flags / "block").unlink(missing_ok=True)
        else:
            (self.flags / "block").touch()


class Running:
    def __init__(self, tmp: Path, store: FakeStore, kind: str = "asyncio", **kw: Any) -> None:
        self.tmp = tmp
        self.path = str(tmp / "sm.sock")
        self.store = store
        self.kind = kind
        cfg = Config()
        cfg.mail.domains = ["example.org"]
        cfg.legacy.host = "192.0.2.25"
        self.policy = RoutingPolicy(cfg, cast(Store, store))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        start = start_socketmap_workers if kind == "workers" else start_socketmap_server
        self.server: Any = self.call(start(f"unix:{self.path}", self.policy, **kw))
        if kind == "workers":  # each worker reads the store once before it serves: tests that block it come after
            deadline = time.monotonic() + 10
            view, slots = self.server.stats.view, self.server.stats.slots
            while not all(view[slot * len(FIELDS) + READY] for slot in range(slots)):
                if time.monotonic() > deadline or store.block is not None:
                    break
                time.sleep(0.01)
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
