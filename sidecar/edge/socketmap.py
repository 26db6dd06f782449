"""The socketmap server Postfix asks for routing (socketmap_table(5)); the decisions are sidecar.auth.routing's.

Wire: each request is one netstring ``NAME KEY``, each reply one netstring ``OK value`` / ``NOTFOUND `` /
``TEMP reason`` / ``TIMEOUT reason`` / ``PERM reason``. Postfix keeps a connection open (up to 10 s idle,
100 s in all) and sends one request at a time; other clients may pipeline, and get their replies strictly in
request order.

More (the reasons and limits behind this module): docs/modules.md, sidecar/edge/socketmap.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sidecar.auth.routing import Reply, RoutingPolicy, Status
from sidecar.wire import netstring

log = logging.getLogger("autoport.socketmap")

MAX_REQUEST = 2048  # bytes of "NAME KEY"; routing refuses keys above 1024 bytes anyway
MAX_IN_FLIGHT = 64  # pipelined requests per connection before we stop reading from it
IDLE_TIMEOUT = 30.0  # Postfix closes its own idle connections after 10 s
REQUEST_TIMEOUT = 10.0  # Postfix gives up after 100 s; answer well before
CACHE_MAX = 50_000  # entries; the cache is cleared when full

MALFORMED = Reply(Status.PERM, "malformed request")
INTERNAL = Reply(Status.TEMP, "internal error")
STALLED = Reply(Status.TIMEOUT, "state store not answering")


class SocketmapRequestError(ValueError):
    """A well-framed payload that is not ``NAME KEY``."""


def parse_request(payload: bytes) -> tuple[str, str]:
    """Split a request payload into (map name, key)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise SocketmapRequestError("request is not UTF-8") from None
    name, sep, key = text.partition(" ")
    if not sep or not name:
        raise SocketmapRequestError("request is not 'NAME KEY'")
    return name, key


def encode_reply(reply: Reply) -> bytes:
    return netstring.encode(reply.wire())


class Stats:
    """Counters for health and metrics."""

    __slots__ = ("cache_hits", "connections", "malformed", "requests", "timeouts")

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.cache_hits = 0
        self.malformed = 0
        self.timeouts = 0


Callback = Callable[[Reply], None]


class _Dispatcher:
    """Runs policy lookups in batches on one worker thread; calls back on the event loop, in submit order."""

    def __init__(
        self,
        policy: RoutingPolicy,
        loop: asyncio.AbstractEventLoop,
        *,
        request_timeout: float,
        cache_ttl: float,
        stats: Stats,
    ) -> None:
        self.policy = policy
        self.loop = loop
        self.request_timeout = request_timeout
        self.cache_ttl = cache_ttl
        self.stats = stats
        self.pending: list[tuple[str, str, Callback]] = []
        self.inflight: list[tuple[str, str, Callback]] = []  # the batch on the worker thread
        self.busy = False  # a batch is on the worker thread (or its flush is scheduled)
        self.started = 0.0  # when the in-flight batch was handed over
        self.stalled = False  # the in-flight batch overran request_timeout and was answered TIMEOUT
        self.cache: dict[tuple[str, str], tuple[float, Reply]] = {}
        self.queue: queue.SimpleQueue[list[tuple[str, str]] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._worker, name="socketmap-lookup", daemon=True)
        self.thread.start()
        self.watchdog = loop.call_later(self._tick, self._check_stall)

    @property
    def _tick(self) -> float:
        return min(1.0, self.request_timeout / 4)

    def submit(self, name: str, key: str, callback: Callback) -> None:
        if self.cache_ttl > 0:
            hit = self.cache.get((name, key))
            if hit is not None and hit[0] > time.monotonic():
                self.stats.cache_hits += 1
                callback(hit[1])
                return
        if self.stalled:
            self.stats.timeouts += 1
            callback(STALLED)
            return
        self.pending.append((name, key, callback))
        if not self.busy:
            self.busy = True
            # gather what every connection sends in this loop iteration into one batch
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            self.busy = False
            return
        self.inflight = batch
        self.started = time.monotonic()
        self.queue.put([(n, k) for n, k, _ in batch])

    # worker thread
    def _worker(self) -> None:
        while True:
            batch = self.queue.get()
            if batch is None:
                return
            replies: list[Reply] = []
            for name, key in batch:
                try:
                    replies.append(self.policy.lookup(name, key))
                except Exception:
                    log.exception("socketmap lookup %s %r failed", name, key[:200])
                    replies.append(INTERNAL)
            try:
                self.loop.call_soon_threadsafe(self._done, replies)
            except RuntimeError:  # the loop is closed: we are shutting down
                return

    def _check_stall(self) -> None:
        self.watchdog = self.loop.call_later(self._tick, self._check_stall)
        if self.inflight and not self.stalled and time.monotonic() - self.started > self.request_timeout:
            self._expire()

    def _expire(self) -> None:
        """The worker is stuck: answer its batch and everything queued behind it now."""
        log.warning(
            "socketmap: store lookup exceeded %.0f s; answering TIMEOUT until it returns",
            self.request_timeout,
        )
        self.stalled = True
        waiting, self.pending = self.inflight + self.pending, []
        self.stats.timeouts += len(waiting)
        for _, _, callback in waiting:
            callback(STALLED)

    def _done(self, replies: list[Reply]) -> None:
        batch, self.inflight = self.inflight, []
        if self.stalled:  # answered already by _expire
            self.stalled = False
            log.warning("socketmap: store answers again")
        else:
            caching = self.cache_ttl > 0
            expires = time.monotonic() + self.cache_ttl
            for (name, key, callback), reply in zip(batch, replies, strict=True):
                if caching and reply.status in (Status.OK, Status.NOTFOUND):
                    if len(self.cache) >= CACHE_MAX:
                        self.cache.clear()
                    self.cache[(name, key)] = (expires, reply)
                callback(reply)
        self._flush()

    def close(self) -> None:
        self.watchdog.cancel()
        self.queue.put(None)


class _Connection(asyncio.Protocol):
    def __init__(self, dispatcher: _Dispatcher, *, max_request: int, idle_timeout: float) -> None:
        self.dispatcher = dispatcher
        self.stats = dispatcher.stats
        self.decoder = netstring.Decoder(max_request)
        self.idle_timeout = idle_timeout
        self.transport: asyncio.Transport | None = None
        # replies in request order; a slot is [reply or None]
        self.slots: collections.deque[list[Reply | None]] = collections.deque()
        self.paused = False
        self.closing = False  # framing broke: answer what came before, then close
        self.last_activity = 0.0
        self.idle_handle: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.stats.connections += 1
        self.last_activity = time.monotonic()
        self.idle_handle = self.dispatcher.loop.call_later(self.idle_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.slots.clear()
        if self.idle_handle is not None:
            self.idle_handle.cancel()

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        broken: netstring.NetstringError | None = None
        try:
            payloads = self.decoder.feed(data)
        except netstring.NetstringError as e:
            self.stats.malformed += 1
            log.warning("socketmap: closing connection: %s", e)
            broken, payloads = e, e.payloads
        for payload in payloads:
            self.stats.requests += 1
            slot: list[Reply | None] = [None]
            self.slots.append(slot)
            try:
                name, key = parse_request(payload)
            except SocketmapRequestError:
                slot[0] = MALFORMED
                continue
            self.dispatcher.submit(name, key, functools.partial(self._fill, slot))
        if broken is not None and self.transport is not None:
            self.closing = True
            self.paused = True
            self.transport.pause_reading()
        self._write_ready()
        if len(self.slots) >= MAX_IN_FLIGHT and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    # --- internals ------------------------------------------------------------------------------------------
    def _fill(self, slot: list[Reply | None], reply: Reply) -> None:
        if slot[0] is None:
            slot[0] = reply
            if self.slots and self.slots[0] is slot:
                self._write_ready()

    def _write_ready(self) -> None:
        slots = self.slots
        out: list[bytes] = []
        while slots and slots[0][0] is not None:
            reply = slots.popleft()[0]
            assert reply is not None
            out.append(encode_reply(reply))
        if self.transport is None:
            return
        if out:
            self.transport.write(b"".join(out))
            self.last_activity = time.monotonic()
        if self.closing:
            if not slots:
                self.transport.close()  # after the buffered replies are written
        elif self.paused and len(slots) < MAX_IN_FLIGHT // 2:
            self.paused = False
            self.transport.resume_reading()

    def _check_idle(self) -> None:
        if self.transport is None:
            return
        idle = time.monotonic() - self.last_activity
        if idle >= self.idle_timeout and not self.slots:
            self.transport.close()
            return
        delay = max(self.idle_timeout - idle, 0.1)
        self.idle_handle = self.dispatcher.loop.call_later(delay, self._check_idle)


def _unix_socket(path: str) -> socket.socket:
    p = Path(path)
    if p.is_socket():
        p.unlink()  # a stale socket from a previous run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    return sock


def parse_address(address: str) -> tuple[str, str, int]:
    """``unix:/PATH`` (or a bare /PATH) -> ("unix", PATH, 0); ``inet:HOST:PORT`` -> ("inet", HOST, PORT)."""
    if address.startswith("/"):
        return "unix", address, 0
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest.startswith("/"):
        return "unix", rest, 0
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and int(port) < 65536:  # 0: any free port (tests)
            return "inet", host, int(port)
    raise ValueError(f"socketmap address must be unix:/PATH or inet:HOST:PORT, not {address!r}")


class SocketmapServer(asyncio.AbstractServer):
    """The listening server (an asyncio.AbstractServer) plus its counters; close() also stops the worker."""

    def __init__(self, server: asyncio.AbstractServer, dispatcher: _Dispatcher, unix_path: str = "") -> None:
        self._server = server
        self._dispatcher = dispatcher
        self._unix_path = unix_path
        self._unix_ino = os.stat(unix_path).st_ino if unix_path else 0
        self.stats = dispatcher.stats

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(getattr(self._server, "sockets", ()) or ())

    def close(self) -> None:
        self._server.close()
        self._dispatcher.close()
        if self._unix_path:
            with contextlib.suppress(OSError):
                if os.stat(self._unix_path).st_ino == self._unix_ino:
                    os.unlink(self._unix_path)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._server.get_loop()

    def is_serving(self) -> bool:
        return self._server.is_serving()

    async def start_serving(self) -> None:
        await self._server.start_serving()

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()


async def start_socketmap_server(
    address: str,
    policy: RoutingPolicy,
    *,
    mode: int = 0o666,
    max_request: int = MAX_REQUEST,
    idle_timeout: float = IDLE_TIMEOUT,
    request_timeout: float = REQUEST_TIMEOUT,
    cache_ttl: float = 0.0,
) -> SocketmapServer:
    """Listen on ``unix:/PATH`` (chmod mode; a stale socket file is replaced) or ``inet:HOST:PORT``.

    close() on the returned server stops listening, stops the worker thread and removes the UNIX socket file.
    Connections already open are served until their client closes them or they go idle.
    """
    loop = asyncio.get_running_loop()
    kind, host, port = parse_address(address)
    dispatcher = _Dispatcher(policy, loop, request_timeout=request_timeout, cache_ttl=cache_ttl, stats=Stats())

    def factory() -> _Connection:
        return _Connection(dispatcher, max_request=max_request, idle_timeout=idle_timeout)

    if kind == "unix":
        sock = _unix_socket(host)
        os.chmod(host, mode)
        server = await loop.create_unix_server(factory, sock=sock)
        return SocketmapServer(server, dispatcher, host)
    server = await loop.create_server(factory, host, port, reuse_address=True)
    return SocketmapServer(server, dispatcher)
