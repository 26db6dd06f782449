"""The socketmap served by worker processes: the same answers as sidecar.edge.socketmap, several times the rate.

The daemon binds the socket, then forks ``[sockets] socketmap_workers`` children. Each runs a plain ``selectors``
loop on that one listening socket (the kernel hands each new connection to one of them) and answers every request
synchronously: parse, RoutingPolicy.lookup (one SELECT), write. No event loop, no thread hop, no GIL shared with
the auth socket or the job runner: that path was the asyncio server's cost (bench/results/routing.md).

- A supervisor process forks them, and forks a worker that dies again (at once, then with a backoff if it
  keeps dying). The daemon forks the supervisor while it has one thread, so no worker is ever a copy of the
  threaded daemon (a copy could inherit a lock another thread held); the daemon forks a supervisor that dies
  again.
  Postfix's connection to a dead worker breaks, Postfix retries the lookup later (a temporary failure, never a
  wrong route); new connections go to the other workers, or wait in the listen backlog for the new one.
- A lookup that overruns ``request_timeout`` is interrupted (a periodic SIGALRM, every request_timeout / 4,
  finds it too old) and answered ``TIMEOUT``; the worker keeps serving. A broken netstring gets the replies of
  the requests before it, then the connection is closed; a well-framed request that is not ``NAME KEY`` gets
  ``PERM`` and the connection stays.
- Counters live in shared memory, a row per worker slot (written by that worker only), summed by the parent for
  the dashboard's metrics.

More: docs/modules.md ("socketmap workers").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from sidecar.auth.routing import Reply, RoutingPolicy, Status
from sidecar.edge.socketmap import (
    CACHE_MAX,
    IDLE_TIMEOUT,
    INTERNAL,
    MALFORMED,
    MAX_REQUEST,
    REQUEST_TIMEOUT,
    STALLED,
    SocketmapRequestError,
    _unix_socket,
    encode_reply,
    parse_address,
    parse_request,
)
from sidecar.wire import netstring

log = logging.getLogger("autoport.socketmap")

FIELDS = ("connections", "requests", "cache_hits", "malformed", "timeouts", "restarts", "ready", "pid")
CONNECTIONS, REQUESTS, CACHE_HITS, MALFORMED_N, TIMEOUTS, RESTARTS, READY, PID = range(len(FIELDS))
READ_SIZE = 65536
MAX_OUTPUT = 256 * 1024  # unsent reply bytes of one connection before we stop reading from it
RESTART_BACKOFF_MAX = 5.0
PR_SET_PDEATHSIG = 1  # prctl(2)
STOP_GRACE = 3.0  # seconds a worker gets after SIGTERM before SIGKILL
READY_TIMEOUT = 10.0  # seconds a new worker has to finish its first store read before it is killed and forked again
UNREADY_LIMIT = 2  # workers of one slot killed in a row for not getting ready before the supervisor is replaced
EXIT_STUCK = 3  # the supervisor's exit status then
WARM_UP_KEY = "autoport-worker-warm-up@invalid"  # a state lookup no account answers (RFC 2606 .invalid)


class SharedStats:
    """The counters of all workers: an anonymous shared mapping made before the fork, a row per worker slot."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._mem = mmap.mmap(-1, max(1, slots) * len(FIELDS) * 8)  # MAP_SHARED: children write, we read
        self.view = memoryview(self._mem).cast("q")

    def row(self, slot: int) -> memoryview:
        return self.view[slot * len(FIELDS) : (slot + 1) * len(FIELDS)]

    def total(self, field: int) -> int:
        return sum(self.view[slot * len(FIELDS) + field] for slot in range(self.slots))

    @property
    def connections(self) -> int:
        return self.total(CONNECTIONS)

    @property
    def requests(self) -> int:
        return self.total(REQUESTS)

    @property
    def cache_hits(self) -> int:
        return self.total(CACHE_HITS)

    @property
    def malformed(self) -> int:
        return self.total(MALFORMED_N)

    @property
    def timeouts(self) -> int:
        return self.total(TIMEOUTS)

    @property
    def restarts(self) -> int:
        return self.total(RESTARTS)


class _Stalled(BaseException):
    """Raised by SIGALRM inside a lookup that overran request_timeout (BaseException: no store code catches it)."""


class _Conn:
    __slots__ = ("closing", "decoder", "events", "last", "out", "sock")

    def __init__(self, sock: socket.socket, max_request: int) -> None:
        self.sock = sock
        self.decoder = netstring.Decoder(max_request)
        self.out = b""
        self.last = time.monotonic()
        self.closing = False  # framing broke: write what is owed, then close
        self.events = selectors.EVENT_READ  # what the selector watches for


class _Worker:
    """One child's loop. Everything here runs in the child process, single-threaded."""

    def __init__(
        self,
        listener: socket.socket,
        policy: RoutingPolicy,
        counts: memoryview,
        *,
        max_request: int,
        idle_timeout: float,
        request_timeout: float,
        cache_ttl: float,
    ) -> None:
        self.listener = listener
        self.policy = policy
        self.counts = counts
        self.max_request = max_request
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.cache_ttl = cache_ttl
        self.cache: dict[tuple[str, str], tuple[float, bytes]] = {}
        self.wire: dict[Reply, bytes] = {}  # encoded replies: routing answers with a handful of distinct ones
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, _Conn] = {}
        self.running = True
        self.lookup_started = 0.0  # monotonic time the current lookup began; 0: none running

    def watchdog(self, signum: int, frame: FrameType | None) -> None:
        """SIGALRM, every request_timeout / 4 (a periodic timer: no system call per request)."""
        started = self.lookup_started
        if started and time.monotonic() - started >= self.request_timeout:
            self.lookup_started = 0.0
            raise _Stalled

    # --- lookups --------------------------------------------------------------------------------------------
    def _encode(self, reply: Reply) -> bytes:
        data = self.wire.get(reply)
        if data is None:
            if len(self.wire) >= 1024:
                self.wire.clear()
            data = self.wire[reply] = encode_reply(reply)
        return data

    def answer(self, payload: bytes) -> bytes:
        counts = self.counts
        counts[REQUESTS] += 1
        try:
            name, key = parse_request(payload)
        except SocketmapRequestError:
            return self._encode(MALFORMED)
        if self.cache_ttl > 0:
            hit = self.cache.get((name, key))
            if hit is not None and hit[0] > time.monotonic():
                counts[CACHE_HITS] += 1
                return hit[1]
        self.lookup_started = time.monotonic()
        try:
            reply = self.policy.lookup(name, key)
        except _Stalled:
            counts[TIMEOUTS] += 1
            log.warning("socketmap: store lookup exceeded %.1f s; answered TIMEOUT", self.request_timeout)
            return self._encode(STALLED)
        except Exception:
            log.exception("socketmap lookup %s %r failed", name, key[:200])
            reply = INTERNAL
        finally:
            self.lookup_started = 0.0
        data = self._encode(reply)
        if self.cache_ttl > 0 and reply.status in (Status.OK, Status.NOTFOUND):
            if len(self.cache) >= CACHE_MAX:
                self.cache.clear()
            self.cache[(name, key)] = (time.monotonic() + self.cache_ttl, data)
        return data

    # --- connections ----------------------------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("socketmap worker cannot accept: %s", e)
                time.sleep(0.1)
                return
            raise
        sock.setblocking(False)
        conn = _Conn(sock, self.max_request)
        self.conns[sock.fileno()] = conn
        self.sel.register(sock, selectors.EVENT_READ, conn)
        self.counts[CONNECTIONS] += 1

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            self.conns.pop(fd, None)
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(conn.sock)
        conn.sock.close()

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.last = time.monotonic()
        try:
            payloads = conn.decoder.feed(data)
        except netstring.NetstringError as e:
            self.counts[MALFORMED_N] += 1
            log.warning("socketmap: closing connection: %s", e)
            payloads = e.payloads
            conn.closing = True
        if payloads:
            answer = self.answer
            replies = [answer(p) for p in payloads]
            conn.out = conn.out + b"".join(replies) if conn.out else b"".join(replies)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            conn.out = conn.out[sent:]
            conn.last = time.monotonic()
        if not conn.out and conn.closing:
            self._close(conn)
            return
        # read while the client reads its replies; write when the kernel would not take everything at once
        reading = not conn.closing and len(conn.out) < MAX_OUTPUT
        events = (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if conn.out else 0)
        if events != conn.events:
            conn.events = events
            self.sel.modify(conn.sock, events, conn)

    def _sweep_idle(self) -> None:
        now = time.monotonic()
        for conn in list(self.conns.values()):
            if now - conn.last >= self.idle_timeout and not conn.out:
                self._close(conn)

    # --- the loop ---------------------------------------------------------------------------------------------
    def run(self, wakeup: socket.socket) -> None:
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.sel.register(wakeup, selectors.EVENT_READ, wakeup)
        tick = max(0.05, min(1.0, self.idle_timeout / 4))
        next_sweep = time.monotonic() + tick
        while self.running:
            for key, mask in self.sel.select(tick):
                data = key.data
                if data is None:
                    self._accept()
                elif data is wakeup:
                    with contextlib.suppress(OSError):
                        wakeup.recv(512)
                else:
                    if mask & selectors.EVENT_WRITE:
                        self._write(data)
                    if mask & selectors.EVENT_READ and data.events & selectors.EVENT_READ:
                        self._read(data)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + tick
                self._sweep_idle()
        for conn in list(self.conns.values()):  # stopping: hand over what is owed, briefly
            if conn.out:
                with contextlib.suppress(OSError):
                    conn.sock.setblocking(True)
                    conn.sock.settimeout(0.5)
                    conn.sock.sendall(conn.out)
            self._close(conn)


def _warm_up(worker: _Worker) -> None:
    """One store read before the first accept, then the READY mark the supervisor waits for.

    A process forked while another thread is inside the database library holds that thread's lock for ever
    (fork copies the lock, not the thread). SQLite's process-wide mutexes are the case that matters: a child
    that inherited one locked hangs on its first query. Here that happens before the worker has taken any
    connection from Postfix, so nobody waits on it, and the supervisor kills a worker that is not READY within
    READY_TIMEOUT and forks another. Workers are copies of the supervisor, forked while the daemon had one
    thread, so this is the watchdog for a supervisor the daemon had to fork again later from its threaded self
    (and for a store that hangs). A store that answers with an error is fine here: the call came back, so no
    lock is stuck."""
    with contextlib.suppress(Exception):
        worker.policy.store.state_of(WARM_UP_KEY)
    worker.counts[READY] = 1


def _child_main(worker: _Worker) -> None:
    """The first thing a forked worker does: signals of its own (never the parent's event loop's wakeup fd)."""
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)

    def stop(signum: int, frame: FrameType | None) -> None:
        worker.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C at a terminal is the parent's to handle
    signal.signal(signal.SIGALRM, worker.watchdog)
    if worker.request_timeout > 0:
        tick = max(0.01, worker.request_timeout / 4)
        signal.setitimer(signal.ITIMER_REAL, tick, tick)
    for sig in (signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    worker.run(wake_r)


def _die_with(parent: int, sig: int = signal.SIGTERM) -> None:
    """`sig` when `parent` goes (even by SIGKILL): nothing keeps answering from an old socket."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:  # it went before prctl took effect
        os._exit(0)


def _own_signals() -> None:
    """A forked child's first step: no handler of the daemon's (its event loop's wakeup fd is the daemon's)."""
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for sig in (signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C at a terminal is the daemon's to handle


class _Supervisor:
    """The process that forks the workers and forks them again when they die. Runs in a child the daemon forks
    while it still has a single thread, and never starts a thread or touches the store itself: every worker,
    the first ones and those started again after a crash, is a copy of an image in which no other thread held a
    lock (a copy of the threaded daemon could inherit a lock held for ever; see _warm_up)."""

    def __init__(self, owner: SocketmapWorkers) -> None:
        self.owner = owner
        slots = owner.stats.slots
        self.pids = [0] * slots
        self.started = [0.0] * slots
        self.backoff = [0.0] * slots
        self.due = [0.0] * slots  # monotonic time a dead slot's worker is forked again
        self.unready = [0] * slots  # workers of this slot killed in a row for not getting ready
        self.stopping = False

    def _field(self, slot: int, field: int) -> int:
        return int(self.owner.stats.view[slot * len(FIELDS) + field])

    def _set(self, slot: int, field: int, value: int) -> None:
        self.owner.stats.view[slot * len(FIELDS) + field] = value

    def run(self) -> int:
        _own_signals()

        def stop(signum: int, frame: FrameType | None) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        for slot in range(len(self.pids)):
            self._spawn(slot)
        code = 0
        while not self.stopping:
            time.sleep(0.1)  # a dead worker is forked again within 0.1 s
            if self._kill_unready():
                code = EXIT_STUCK
                break
            self._reap()
        self._stop_workers()
        return code

    def _spawn(self, slot: int) -> None:
        parent = os.getpid()
        self._set(slot, READY, 0)
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the supervisor's handler: until _child_main's
                _die_with(parent, signal.SIGKILL)  # a worker without its supervisor is nobody's to stop
                self._set(slot, PID, os.getpid())
                if self.owner.on_fork is not None:
                    self.owner.on_fork()
                worker = _Worker(self.owner.listener, self.owner.policy, self.owner.stats.row(slot),
                                 **self.owner.limits)  # fmt: skip
                _warm_up(worker)
                _child_main(worker)
            except BaseException:
                code = 1
                with contextlib.suppress(BaseException):
                    log.exception("socketmap worker %d failed", slot)
            finally:
                os._exit(code)
        self.pids[slot] = pid
        self._set(slot, PID, pid)
        self.started[slot] = time.monotonic()
        self.due[slot] = 0.0

    def _kill_unready(self) -> bool:
        """SIGKILL a worker that has not finished its warm-up read within READY_TIMEOUT (see _warm_up); _reap
        forks it again. True: a slot's workers did that UNREADY_LIMIT times in a row, so this image may hold a
        stuck lock (it was forked again from the threaded daemon): the daemon forks a new supervisor."""
        now = time.monotonic()
        for slot, pid in enumerate(self.pids):
            if not pid:
                continue
            if self._field(slot, READY):
                self.unready[slot] = 0
            elif now - self.started[slot] > READY_TIMEOUT:
                log.error("socketmap worker %d (pid %d) did not read the store within %.0f s; killing it",
                          slot, pid, READY_TIMEOUT)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.started[slot] = now  # killed once, not again at every turn until it is reaped
                self.unready[slot] += 1
                if self.unready[slot] >= UNREADY_LIMIT:
                    log.error("socketmap workers of slot %d never got ready %d times in a row; starting the "
                              "supervisor again", slot, UNREADY_LIMIT)  # fmt: skip
                    return True
        return False

    def _reap(self) -> None:
        now = time.monotonic()
        for slot, pid in enumerate(self.pids):
            if pid:
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done, status = pid, 0
                if not done:
                    continue
                lived = now - self.started[slot]
                self.backoff[slot] = 0.0 if lived > 10 else min(max(0.1, self.backoff[slot] * 2), RESTART_BACKOFF_MAX)
                how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"status {status >> 8}"
                log.error("socketmap worker %d (pid %d) ended (%s); starting it again", slot, pid, how)
                self.pids[slot] = 0
                self._set(slot, PID, 0)
                self.due[slot] = now + self.backoff[slot]
                self._set(slot, RESTARTS, self._field(slot, RESTARTS) + 1)
            if not self.pids[slot] and now >= self.due[slot] and not self.stopping:
                self._spawn(slot)

    def _stop_workers(self) -> None:
        pids = [p for p in self.pids if p]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for pid in pids:
            while True:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if done:
                    break
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
                    break
                time.sleep(0.01)


class SocketmapWorkers:
    """The listening socket, the supervisor process and its workers; the asyncio.AbstractServer surface the
    daemon uses. Construct it before the daemon starts any thread (the supervisor is forked here)."""

    def __init__(
        self,
        listener: socket.socket,
        policy: RoutingPolicy,
        workers: int,
        *,
        unix_path: str = "",
        max_request: int = MAX_REQUEST,
        idle_timeout: float = IDLE_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        cache_ttl: float = 0.0,
        on_fork: Callable[[], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("socketmap workers must be at least 1")
        self.listener = listener
        self.policy = policy
        self.stats = SharedStats(workers)
        self.limits: dict[str, Any] = {
            "max_request": max_request,
            "idle_timeout": idle_timeout,
            "request_timeout": request_timeout,
            "cache_ttl": cache_ttl,
        }
        self.on_fork = on_fork
        self._unix_path = unix_path
        self._unix_ino = os.stat(unix_path).st_ino if unix_path else 0
        self.supervisor_pid = 0
        self.supervisor_restarts = 0
        self._started = 0.0
        self._backoff = 0.0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._closed = threading.Event()
        self._spawn_supervisor()
        self._thread = threading.Thread(target=self._watch, name="socketmap-supervisor", daemon=True)
        self._thread.start()

    @property
    def pids(self) -> list[int]:
        """The workers' process ids, a slot each (the last one a slot had, once stopped)."""
        return [int(self.stats.view[slot * len(FIELDS) + PID]) for slot in range(self.stats.slots)]

    # --- processes ------------------------------------------------------------------------------------------
    def _spawn_supervisor(self) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the supervisor: never returns
            code = 0
            try:
                _die_with(parent)  # SIGTERM: it stops its workers and ends
                code = _Supervisor(self).run()
            except BaseException:
                code = 1
                with contextlib.suppress(BaseException):
                    log.exception("socketmap supervisor failed")
            finally:
                os._exit(code)
        self.supervisor_pid = pid
        self._started = time.monotonic()

    def _watch(self) -> None:
        """The daemon's side: reap the supervisor; one that ended is forked again (with a backoff if it keeps
        ending). That fork is from the threaded daemon; its workers' READY watchdog and EXIT_STUCK cover it."""
        while True:
            pid = self.supervisor_pid
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                status = 0
            with self._lock:
                if self._stopping.is_set():
                    break
                lived = time.monotonic() - self._started
                self._backoff = 0.0 if lived > 10 else min(max(0.1, self._backoff * 2), RESTART_BACKOFF_MAX)
                how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"status {status >> 8}"
                log.error("socketmap supervisor (pid %d) ended (%s); starting it again", pid, how)
            if self._stopping.wait(self._backoff):
                break
            with self._lock:
                if self._stopping.is_set():
                    break
                self.supervisor_restarts += 1
                for slot in range(self.stats.slots):  # each of its workers is started again (the metric's count)
                    self.stats.view[slot * len(FIELDS) + RESTARTS] += 1
                    self.stats.view[slot * len(FIELDS) + READY] = 0
                self._spawn_supervisor()
        self._closed.set()

    def _stop_workers(self) -> None:
        """SIGTERM the supervisor, which stops its workers (SIGKILL after STOP_GRACE); SIGKILL it if it does
        not end soon after that (its workers die with it: their death signal is SIGKILL)."""
        with self._lock:
            self._stopping.set()
            pid = self.supervisor_pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        self._thread.join(STOP_GRACE + 2)
        if self._thread.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._thread.join(5)
        self._closed.set()

    # --- asyncio.AbstractServer surface -----------------------------------------------------------------------
    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self.listener,)

    def close(self) -> None:
        """Stop listening (the socket file goes), then stop the workers (SIGTERM; SIGKILL after a grace)."""
        if self._stopping.is_set():
            return
        if self._unix_path:
            with contextlib.suppress(OSError):
                if os.stat(self._unix_path).st_ino == self._unix_ino:
                    os.unlink(self._unix_path)
        self._stop_workers()
        self.listener.close()

    def is_serving(self) -> bool:
        return not self._stopping.is_set()

    async def wait_closed(self) -> None:
        import asyncio

        await asyncio.to_thread(self._closed.wait, STOP_GRACE + 10)


async def start_socketmap_workers(
    address: str,
    policy: RoutingPolicy,
    *,
    workers: int = 2,
    mode: int = 0o666,
    max_request: int = MAX_REQUEST,
    idle_timeout: float = IDLE_TIMEOUT,
    request_timeout: float = REQUEST_TIMEOUT,
    cache_ttl: float = 0.0,
    on_fork: Callable[[], None] | None = None,
) -> SocketmapWorkers:
    """Bind ``unix:/PATH`` (chmod mode; a stale socket file is replaced) or ``inet:HOST:PORT`` and fork the
    workers on it. The same answers as start_socketmap_server; close() stops them and removes the socket file."""
    kind, host, port = parse_address(address)
    if kind == "unix":
        sock = _unix_socket(host)
        os.chmod(host, mode)
        path = host
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        path = ""
    sock.listen(socket.SOMAXCONN)
    sock.setblocking(False)
    return SocketmapWorkers(
        sock,
        policy,
        workers,
        unix_path=path,
        max_request=max_request,
        idle_timeout=idle_timeout,
        request_timeout=request_timeout,
        cache_ttl=cache_ttl,
        on_fork=on_fork,
    )
