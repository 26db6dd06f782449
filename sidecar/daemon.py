"""`autoport serve`: the sidecar daemon.

It owns the sockets Postfix and Dovecot call (the checkpassword auth socket, the SASL relay, the socketmap) and
the job runner, all sharing one store and one account-state module; the milter runs in a child process it
supervises. It tells systemd when it is ready (sd_notify READY=1, for `Type=notify` units) and stops cleanly on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import grp
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sidecar.config import Config, unix_path
from sidecar.store.base import Store, StoreError

log = logging.getLogger("autoport.daemon")

HASH_NICE = 19  # the deferred argon2 hashes yield the CPU to live logins and lookups


def _lower_thread_priority(nice: int = HASH_NICE) -> None:
    """Run the calling thread (only: Linux keeps the nice value per thread) at `nice`; trouble is logged."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as e:
        log.warning("hash thread: cannot lower its priority to nice %d (%s)", nice, e)


def hash_executor() -> concurrent.futures.ThreadPoolExecutor:
    """One thread at nice 19: verified passwords are hashed after the answer, in the order they were verified,
    and an argon2 hash (tens of ms of CPU) never delays a login or a lookup waiting for a CPU."""
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="hash", initializer=_lower_thread_priority
    )


def sd_notify(message: str) -> None:
    """Send a status line to systemd's notify socket when there is one (no-op otherwise)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.sendall(message.encode())


def secure_socket(path: str, group: str, mode: int) -> None:
    """Give a UNIX socket its group and mode; a missing group is a warning (the socket keeps its owner's)."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("socket %s: group %r does not exist; leaving the socket's group as is", path, group)
    else:
        with contextlib.suppress(PermissionError):
            os.chown(path, -1, gid)
    os.chmod(path, mode)


def _prepare_unix_path(path: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.is_socket():
        p.unlink()


MILTER_COUNTERS = ("messages", "records", "dropped", "errors")


class MilterProcess:
    """The milter (sidecar.edge.milter) in a child process, restarted with backoff whenever it dies.

    A process of its own: in the daemon's interpreter the milter's callbacks competed with the socketmap and
    the auth socket for the GIL and Postfix accepted half as much mail (bench/results/routing.md). The child
    reads the same config file and opens its own store connection; its counters arrive as JSON lines on its
    stdout and are summed over restarts. While it is down, Postfix's milter_default_action lets mail through.
    """

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self.proc: subprocess.Popen[str] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._done = dict.fromkeys(MILTER_COUNTERS, 0)  # counters of children that ended
        self._current = dict.fromkeys(MILTER_COUNTERS, 0)
        self._thread = threading.Thread(target=self._supervise, name="milter-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: self._done[k] + self._current[k] for k in MILTER_COUNTERS}

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            argv = [sys.executable, "-m", "sidecar.edge.milter", "--config", self.config_path]
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    counts = json.loads(line)
                    with self._lock:
                        self._current = {k: int(counts.get(k, 0)) for k in MILTER_COUNTERS}
            code = self.proc.wait()
            with self._lock:
                for k in MILTER_COUNTERS:
                    self._done[k] += self._current[k]
                self._current = dict.fromkeys(MILTER_COUNTERS, 0)
            if self._stopping.is_set():
                return
            if time.monotonic() - started > 60:
                backoff = 1.0
            self.restarts += 1
            log.error("milter process exited (status %s); starting it again in %.0f s", code, backoff)
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, 30.0)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the child (libmilter stops, queued records are written), SIGKILL after timeout."""
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._thread.is_alive():
            self._thread.join(5)


class Daemon:
    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.stopping = asyncio.Event()
        self.milter: MilterProcess | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.runner: Any = None
        self.agent: Any = None
        self.hasher: concurrent.futures.ThreadPoolExecutor | None = None
        self.verifier: Any = None
        self.limiter: Any = None
        self.aliases: Any = None

    async def start(self) -> None:
        from sidecar.auth.policy import AuthPolicy, CredentialCache
        from sidecar.auth.routing import RoutingPolicy
        from sidecar.edge.auth_server import start_auth_server
        from sidecar.edge.socketmap import start_socketmap_server
        from sidecar.legacy.verify import LegacyVerifier

        cfg = self.cfg
        # The socketmap first, before this process starts any thread of its own (the dashboard's, the legacy
        # verifier's, the job runner's, the node agent's): its supervisor process is forked here, it forks
        # every worker, and a child forked while another thread holds a lock (SQLite's, OpenSSL's) hangs at
        # its first store read. Forked later, both workers of a restarted sidecar were seen to hang until the
        # READY watchdog (10 s) killed them, and mail for that while got 451 at RCPT (test_milter_e2e.py).
        routing = RoutingPolicy(cfg, self.store)
        sm = cfg.sockets.socketmap
        sm_path = unix_path(sm)
        workers = cfg.sockets.socketmap_workers
        start_sm: Any = start_socketmap_server
        if workers > 0:
            from sidecar.edge.socketmap_worker import start_socketmap_workers

            start_sm = functools.partial(start_socketmap_workers, workers=workers)
        if sm_path:
            _prepare_unix_path(sm_path)
            socketmap = await start_sm(f"unix:{sm_path}", routing, mode=cfg.sockets.mode)
            secure_socket(sm_path, cfg.sockets.postfix_group, cfg.sockets.mode)
        else:
            socketmap = await start_sm(sm, routing)
        self.servers.append(socketmap)
        log.info("socketmap listening on %s (%s)", sm, f"{workers} worker processes" if workers else "in-process")

        from sidecar.migration.jobs import JobRunner

        self.credentials = CredentialCache()
        self.hasher = hash_executor()
        from sidecar.legacy.limit import LegacyLimiter

        # one cap for every connection this node's sidecar opens toward the legacy server (Postfix's relay apart)
        self.limiter = LegacyLimiter.from_config(cfg.limits)
        self.verifier = LegacyVerifier(cfg.legacy, limiter=self.limiter)
        auth_policy = AuthPolicy(cfg, self.store, self.verifier, credentials=self.credentials, defer=self.hasher.submit)
        from sidecar.migration.cutover import NodeAgent
        from sidecar.migration.jobs import default_hooks

        # every node, with or without a job runner, closes its proxied sessions when an account cuts over
        self.agent = NodeAgent(cfg, self.store)
        hooks = default_hooks(cfg, self.store, poke=self.agent.poke)
        self.runner = JobRunner(cfg, self.store, self.credentials, hooks=hooks, limiter=self.limiter)
        if cfg.sockets.milter:
            if importlib.util.find_spec("Milter") is None:
                log.error("[sockets] milter is set but pymilter is not installed (the `milter` extra): no milter")
            elif not cfg.path:
                log.error("the milter process needs the daemon's config file; started without one: no milter")
            else:
                self.milter = MilterProcess(cfg.path)
        # the dashboard first: once the mail sockets exist it is up too; it sees the rest as they start
        sources = await self._start_dashboard()

        def queued(address: str) -> None:
            with contextlib.suppress(StoreError):
                self.store.wake(address, "copy")
            self.runner.poke()

        auth_policy.on_queued = queued
        _prepare_unix_path(cfg.sockets.auth)
        self.servers.append(await start_auth_server(cfg.sockets.auth, auth_policy, mode=cfg.sockets.mode))
        secure_socket(cfg.sockets.auth, cfg.sockets.auth_group, cfg.sockets.mode)
        log.info("auth socket listening on %s", cfg.sockets.auth)

        if cfg.sockets.sasl:
            from sidecar.edge.saslrelay import start_sasl_relay

            _prepare_unix_path(cfg.sockets.sasl)
            relay = await start_sasl_relay(cfg.sockets.sasl, cfg.sockets.dovecot_auth, mode=cfg.sockets.mode)
            self.servers.append(relay)
            secure_socket(cfg.sockets.sasl, cfg.sockets.postfix_group, cfg.sockets.mode)
            log.info("SMTP AUTH relay listening on %s (to Dovecot's %s)", cfg.sockets.sasl, cfg.sockets.dovecot_auth)

        if sources is not None:
            sources.socketmap = getattr(socketmap, "stats", None)

        self.agent.start()
        log.info("node %s: heartbeat and cutover kicks on", self.agent.node)
        from sidecar.mta.aliasmap import Keeper

        self.aliases = Keeper(cfg, self.store)
        if await asyncio.to_thread(self.aliases.start):
            log.info("alias map %s kept from the store", self.aliases.map.spec if self.aliases.map else "")
        if cfg.limits.copy_concurrency > 0:
            self.runner.start()
            log.info("job runner: %d concurrent copies, owner %s", cfg.limits.copy_concurrency, self.runner.owner)
        else:
            log.info("job runner off (limits.copy_concurrency = 0): copy jobs wait for another node")

        if self.milter is not None:
            milter_path = unix_path(cfg.sockets.milter)
            if milter_path:
                _prepare_unix_path(milter_path)
            self.milter.start()
            if milter_path:
                # libmilter creates the socket in the child, with the process umask: give it the group and
                # mode Postfix needs as soon as it is there (Postfix's milter_default_action covers a
                # connection in between)
                await self._secure_when_created(milter_path, cfg.sockets.postfix_group)

    async def _secure_when_created(self, path: str, group: str, timeout: float = 15.0) -> None:
        """Wait (bounded) for the milter child's socket; the child secures it too, after every restart."""
        deadline = time.monotonic() + timeout
        while not Path(path).is_socket():
            if time.monotonic() > deadline:
                log.error("milter socket %s did not appear; Postfix accepts mail without the milter", path)
                return
            await asyncio.sleep(0.02)
        secure_socket(path, group, self.cfg.sockets.mode)

    async def _start_dashboard(self) -> Any:
        """Start the dashboard on [dashboard] listen; its trouble is logged, never stops the mail path."""
        if not self.cfg.dashboard.listen:
            return None
        from sidecar.edge.metrics import Sources
        from sidecar.edge.web import start_web_server

        sources = Sources(self.cfg, self.store, runner=self.runner, legacy=self.limiter)
        sources.milter = self.milter.snapshot if self.milter else None
        try:
            self.servers.append(await start_web_server(self.cfg.dashboard.listen, self.cfg.dashboard.token, sources))
        except (OSError, ValueError) as e:
            log.error("dashboard not started on %s: %s", self.cfg.dashboard.listen, e)
            return None
        log.info("dashboard listening on http://%s/", self.cfg.dashboard.listen)
        return sources

    async def stop(self) -> None:
        if self.limiter is not None:  # copies and checks waiting for a legacy connection give up now
            self.limiter.close()
        if self.runner is not None:
            await asyncio.to_thread(self.runner.stop)
        if self.agent is not None:
            await asyncio.to_thread(self.agent.stop)
        if self.aliases is not None:
            await asyncio.to_thread(self.aliases.stop)
        for server in self.servers:
            server.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        if self.hasher is not None:  # hashes of passwords verified before the stop still land in the store
            await asyncio.to_thread(self.hasher.shutdown, wait=True)
        if self.verifier is not None:  # its connections kept ready toward the legacy server
            await asyncio.to_thread(self.verifier.close)
        if self.milter is not None:
            await asyncio.to_thread(self.milter.stop)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.start()
        sd_notify("READY=1\nSTATUS=serving")
        log.info("autoport sidecar ready (pid %d)", os.getpid())
        await self.stopping.wait()
        sd_notify("STOPPING=1")
        log.info("stopping")
        await self.stop()


def serve(cfg: Config) -> int:
    from sidecar.logsetup import setup_logging
    from sidecar.store import open_store

    setup_logging(cfg)
    store = open_store(cfg.store.url, dovecot_group=cfg.store.dovecot_group, dovecot_role=cfg.store.dovecot_role)
    version = store.schema_version()
    if version == 0:
        log.error("the store at %s has no schema: run `autoport store init` first", cfg.store.url.split("@")[-1])
        return 2
    try:
        asyncio.run(Daemon(cfg, store).run())
    finally:
        store.close()
    return 0
