"""The message-log milter: one MessageRecord per accepted recipient, written to the store (pymilter).

It only records. Whatever goes wrong here (a bad header, a slow or broken store, a full queue, a bug) the
message goes through: every callback answers CONTINUE (ACCEPT at end of message), pymilter's exception policy
is CONTINUE instead of its default TEMPFAIL, and what could not be recorded is counted in
``MilterStats.dropped``. Records go to a bounded queue drained by one writer thread in batches
(store.log_messages), so a slow store never stalls Postfix's milter conversation.

More (the reasons and limits behind this module): docs/modules.md, sidecar/edge/milter.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import Milter

from sidecar.config import Config
from sidecar.store.base import MessageRecord, Store

log = logging.getLogger("autoport.milter")

CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT

MILTER_NAME = "autoport"
MILTER_TIMEOUT = 30  # seconds libmilter waits on Postfix
QUEUE_MAX = 10_000  # records waiting for the store; beyond that they are dropped (and counted)
BATCH_MAX = 500  # records per store.log_messages call
MAX_HEADER_VALUE = 998  # RFC 5322 line limit; longer values are cut
MAX_RECIPIENTS = 1000  # per message (Postfix's smtpd_recipient_limit default)
BARE_ROUTES = ("retry", "error", "discard")  # their "host" is a reason text, not a nexthop
HEADERS = {"message-id": "message_id", "auto-submitted": "auto_submitted", "precedence": "precedence",
           "list-id": "list_id"}  # fmt: skip


_Callback = TypeVar("_Callback", bound=Callable[..., int])


def _noreply(func: _Callback) -> _Callback:
    """Milter.noreply, typed: negotiates SMFIP_NR_* for the callback and answers NOREPLY where agreed."""
    return cast(_Callback, Milter.noreply(func))


class MilterStats:
    """Counters for health and metrics (read from any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.messages = 0  # messages seen at end of message
        self.records = 0  # records written to the store
        self.dropped = 0  # records lost: queue full, store error, or a fault in the milter itself
        self.errors = 0  # callbacks that raised (the message still went through)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"messages": self.messages, "records": self.records, "dropped": self.dropped,
                    "errors": self.errors}  # fmt: skip


class RecordWriter:
    """A bounded queue of MessageRecords and the thread that writes them to the store in batches."""

    def __init__(self, store: Store, stats: MilterStats, *, maxsize: int = QUEUE_MAX) -> None:
        self.store = store
        self.stats = stats
        self.queue: queue.Queue[MessageRecord | None] = queue.Queue(maxsize)
        self.thread = threading.Thread(target=self._run, name="milter-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, records: list[MessageRecord]) -> None:
        """Queue records without ever blocking; what does not fit is dropped and counted."""
        for i, record in enumerate(records):
            try:
                self.queue.put_nowait(record)
            except queue.Full:
                lost = len(records) - i
                self.stats.add(dropped=lost)
                log.warning("milter: record queue full, %d record(s) dropped", lost)
                return

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to timeout seconds), then end the thread."""
        if not self.thread.is_alive():
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.queue.put(None, timeout=0.1)
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    return
        self.thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            done = False
            while len(batch) < BATCH_MAX:
                try:
                    record = self.queue.get_nowait()
                except queue.Empty:
                    break
                if record is None:
                    done = True
                    break
                batch.append(record)
            try:
                self.store.log_messages(batch)
            except Exception as e:
                self.stats.add(dropped=len(batch))
                log.warning("milter: %d record(s) dropped, the store refused them: %s", len(batch), e)
            else:
                self.stats.add(records=len(batch))
            if done:
                return


def _unbracket(address: str) -> str:
    a = address.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1]
    return a


class _Shared:
    """What every connection's milter object uses: config-derived values, the writer, the counters."""

    def __init__(self, cfg: Config, writer: RecordWriter, stats: MilterStats) -> None:
        self.lowercase = cfg.mail.lowercase
        self.legacy_addrs = legacy_addresses(cfg.legacy.host)
        self.writer = writer
        self.stats = stats


def legacy_addresses(host: str) -> frozenset[str]:
    """The legacy server's address(es): the configured value and, for a name, what it resolves to now."""
    addrs = {host.strip("[]")}
    with contextlib.suppress(OSError, UnicodeError):
        for info in socket.getaddrinfo(host.strip("[]"), None, proto=socket.IPPROTO_TCP):
            addrs.add(str(info[4][0]))
    return frozenset(addrs)


class MessageLogMilter(Milter.Base):  # type: ignore[misc]
    """One instance per SMTP connection (libmilter thread)."""

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.client_addr = ""
        self._protocol = 0  # Milter.Base's: the options negotiate() agreed (no super().__init__ without a ctx)
        self._reset()

    def _reset(self) -> None:
        self.sender = ""
        self.auth_user = ""
        self.rcpts: list[tuple[str, str]] = []  # (recipient, route)
        self.fields: dict[str, str] = {}
        self.size = 0
        self.in_message = False

    def _fault(self, where: str) -> None:
        self.shared.stats.add(errors=1)
        log.exception("milter: error in %s; the message goes through unrecorded or partly recorded", where)

    def _macro(self, name: str) -> str:
        value = self.getsymval(name)
        if value is None:
            return ""
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return str(value)[:MAX_HEADER_VALUE]

    # --- callbacks: each returns CONTINUE (ACCEPT at end of message), whatever happens -------------------
    # @noreply: Postfix is told (SMFIP_NR_*) not to wait for our answer to these (one a header!); it goes on at
    # once. Not overriding hello/data/unknown/eoh leaves them negotiated away (SMFIP_NO*): Postfix never sends
    # them. connect keeps its reply: once per SMTP connection, and pymilter's test context closes on NOREPLY.
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        try:
            if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
                # libmilter gives (ip, port[, flow, scope]); some harnesses give the bare ip
                self.client_addr = str(hostaddr[0] if isinstance(hostaddr, tuple) else hostaddr)
            else:  # AF_UNIX (local submission), or unknown
                self.client_addr = self._macro("{client_addr}")
        except Exception:
            self._fault("connect")
        return CONTINUE

    @_noreply
    def envfrom(self, mailfrom: str, *params: str) -> int:
        try:
            self._reset()
            self.in_message = True
            self.sender = _unbracket(mailfrom)[:MAX_HEADER_VALUE]
            self.auth_user = self._macro("{auth_authen}")
            if not self.client_addr:
                self.client_addr = self._macro("{client_addr}")
        except Exception:
            self._fault("envfrom")
        return CONTINUE

    @_noreply
    def envrcpt(self, to: str, *params: str) -> int:
        try:
            if len(self.rcpts) < MAX_RECIPIENTS:
                rcpt = _unbracket(to)
                if self.shared.lowercase:
                    rcpt = rcpt.lower()
                self.rcpts.append((rcpt[:MAX_HEADER_VALUE], self._route()))
        except Exception:
            self._fault("envrcpt")
        return CONTINUE

    def _route(self) -> str:
        mailer = self._macro("{rcpt_mailer}")
        host = self._macro("{rcpt_host}")
        if not host or mailer in BARE_ROUTES:
            return mailer
        return f"{mailer}:{host}"

    @_noreply
    def header(self, field: str, value: str) -> int:
        try:
            self.size += len(field) + len(value) + 4  # "Field: value\r\n"
            attr = HEADERS.get(field.lower())
            if attr is not None and attr not in self.fields:
                self.fields[attr] = " ".join(str(value).split())[:MAX_HEADER_VALUE]
        except Exception:
            self._fault("header")
        return CONTINUE

    @_noreply
    def body(self, chunk: bytes) -> int:
        self.size += len(chunk)
        return CONTINUE

    def eom(self) -> int:
        try:
            self.shared.stats.add(messages=1)
            records = self._records()
            self.shared.writer.put(records)
        except Exception:
            self._fault("eom")
            self.shared.stats.add(dropped=len(self.rcpts))
        finally:
            self._reset()
        return ACCEPT

    def abort(self) -> int:
        self._reset()
        return CONTINUE

    def close(self) -> int:
        return CONTINUE

    def _records(self) -> list[MessageRecord]:
        queue_id = self._macro("i")
        # the empty line after the header section (counted here: no eoh callback, one event less per message)
        size = self.size + 2 if self.size else 0
        now = time.time()
        from_legacy = self.client_addr in self.shared.legacy_addrs
        return [
            MessageRecord(
                queue_id=queue_id,
                recipient=rcpt,
                sender=self.sender,
                message_id=self.fields.get("message_id", ""),
                route=route,
                size=size,
                auto_submitted=self.fields.get("auto_submitted", ""),
                precedence=self.fields.get("precedence", ""),
                list_id=self.fields.get("list_id", ""),
                client_addr=self.client_addr,
                auth_user=self.auth_user,
                from_legacy=from_legacy,
                at=now,
            )
            for rcpt, route in self.rcpts
        ]


def libmilter_address(address: str) -> str:
    """Postfix's notation (inet:HOST:PORT, inet:[v6]:PORT, unix:PATH, /PATH) -> libmilter's."""
    if address.startswith("/"):
        return f"unix:{address}"
    kind, _, rest = address.partition(":")
    if kind in ("unix", "local") and rest.startswith("/"):
        return f"unix:{rest}"
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            if host.startswith("[") and host.endswith("]"):
                return f"inet6:{port}@{host[1:-1]}"
            if ":" in host:
                return f"inet6:{port}@{host}"
            return f"inet:{port}@{host}"
    raise ValueError(f"milter address must be inet:HOST:PORT or unix:/PATH, not {address!r}")


# libmilter is process-global and runs once per process: after smfi_stop() a second smfi_main() returns at
# once (measured with pymilter 1.0.5 / libmilter 8.17), so `autoport serve` runs one milter for its lifetime.
_running = threading.Lock()
stats = MilterStats()  # the counters of the milter running in this process


def run_milter(
    cfg: Config, store: Store, stop_event: threading.Event, *, milter_stats: MilterStats | None = None
) -> MilterStats:
    """Serve the milter on cfg.sockets.milter in the calling thread until stop_event is set (or stop_milter()).

    Returns the counters. Raises ValueError for a bad address, milter.error when libmilter cannot listen.
    """
    address = libmilter_address(cfg.sockets.milter)
    if not _running.acquire(blocking=False):
        raise RuntimeError("a milter is already running in this process")
    counters = milter_stats or stats
    writer = RecordWriter(store, counters)
    shared = _Shared(cfg, writer, counters)
    writer.start()

    def watch() -> None:
        stop_event.wait()
        Milter.stop()

    watcher = threading.Thread(target=watch, name="milter-stop", daemon=True)
    try:
        Milter.factory = lambda: MessageLogMilter(shared)
        Milter.set_exception_policy(CONTINUE)
        watcher.start()
        log.info("milter listening on %s (%s)", cfg.sockets.milter, address)
        Milter.runmilter(MILTER_NAME, address, MILTER_TIMEOUT)
    finally:
        stop_event.set()
        writer.stop()
        _running.release()
        log.info("milter stopped: %s", counters.snapshot())
    return counters


def stop_milter() -> None:
    """Ask a running milter to stop (libmilter smfi_stop); run_milter() then returns."""
    with contextlib.suppress(Exception):
        Milter.stop()


STATS_INTERVAL = 1.0  # seconds between the counter lines a milter process writes for its daemon


def remove_stale_socket(path: str) -> None:
    """Remove the socket a killed milter process left at path (libmilter would replace it, but only after the
    child's secure() thread had already found the old file there and given *it* the mode: the new socket then kept
    the umask's 0755 and Postfix could not connect). Anything but a socket is left alone."""
    if not path:
        return
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


def child_main(argv: list[str] | None = None) -> int:
    """`python -m sidecar.edge.milter --config FILE`: the milter in a process of its own, as `autoport serve` runs it.

    Its own interpreter keeps libmilter's callbacks off the daemon's GIL (bench/results/routing.md). The counters
    go to stdout, one JSON line a second, for the daemon's dashboard. SIGTERM stops it (libmilter handles it).
    """
    import argparse
    import json

    from sidecar import config as config_mod
    from sidecar.config import unix_path
    from sidecar.logsetup import setup_logging
    from sidecar.store import open_store

    parser = argparse.ArgumentParser(prog="python -m sidecar.edge.milter")
    parser.add_argument("--config", required=True)
    cfg = config_mod.load(parser.parse_args(argv).config)
    setup_logging(cfg)
    store = open_store(cfg.store.url, dovecot_group=cfg.store.dovecot_group, dovecot_role=cfg.store.dovecot_role)
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(STATS_INTERVAL):
            print(json.dumps(stats.snapshot()), flush=True)

    path = unix_path(cfg.sockets.milter)
    remove_stale_socket(path)

    def secure() -> None:  # libmilter creates the socket with the umask; Postfix needs its group and mode
        from sidecar.daemon import secure_socket

        deadline = time.monotonic() + 30
        while path and not stop.is_set() and time.monotonic() < deadline:
            if os.path.exists(path):
                secure_socket(path, cfg.sockets.postfix_group, cfg.sockets.mode)
                return
            time.sleep(0.02)

    threading.Thread(target=report, name="milter-stats", daemon=True).start()
    threading.Thread(target=secure, name="milter-socket", daemon=True).start()
    try:
        run_milter(cfg, store, stop)
    finally:
        stop.set()
        print(json.dumps(stats.snapshot()), flush=True)
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main())
