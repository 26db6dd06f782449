"""How hard this node may press the legacy server: a cap on connections, a share kept for logins, a byte rate.

    limiter = LegacyLimiter.from_config(cfg.limits)
    with limiter.acquire("imap"):          # copier; "login" for a password check; LegacyBusy when none is free
        ...; limiter.throttle(len(data))   # bytes read by the copier (limits.legacy_bytes_per_second)

Copies ("imap", "pop3", "sieve") never hold more than legacy_connections - legacy_login_connections, so that
many stay free for password checks; checks may use any free connection, and while a check waits for one no
copy takes a connection that comes free (a user waiting to log in goes before a copy that can wait).
Connections kept ready for checks take only the reserved share. More: docs/modules.md, sidecar/legacy/limit.py.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

from sidecar.legacy.errors import LegacyUnavailable

KINDS = ("login", "imap", "pop3", "sieve")  # login: password checks and their ready connections; the rest: copies
LOGIN_WAIT = 3.0  # seconds a password check waits for a connection before it answers "try later"
COPY_WAIT = 120.0  # seconds a copy waits for one before the job is put back (SourceBusy)
BURST = 1 << 16  # bytes the rate may run ahead (one read of the copier)
_HOURS = re.compile(r"^(\d{1,2})-(\d{1,2})$")


class LegacyBusy(LegacyUnavailable):
    """Every connection toward the legacy server this kind may use is taken (temporary: try again later)."""


def parse_hours(text: str) -> tuple[int, int] | None:
    """"08-18" -> (8, 18): local hours from 08:00 to 17:59 ("22-06" wraps past midnight); "" -> None (always).
    ValueError with the reason otherwise."""
    text = text.strip()
    if not text:
        return None
    m = _HOURS.match(text)
    if not m:
        raise ValueError(f"must look like 08-18 (from hour - to hour, local time), not {text!r}")
    start, end = int(m.group(1)), int(m.group(2))
    if not (0 <= start <= 23 and 0 <= end <= 24) or start == end:
        raise ValueError(f"must name two different hours 0-24, not {text!r}")
    return start, end


def _local_hour() -> int:
    return time.localtime().tm_hour


class Permit:
    """One connection's place under the cap; release() is idempotent (a closed session may be closed again)."""

    def __init__(self, limiter: LegacyLimiter, kind: str, ready: bool) -> None:
        self.limiter, self.kind, self.ready = limiter, kind, ready
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limiter._release(self)

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LegacyLimiter:
    """Per node, thread-safe. connections = 0: no cap (and no share); bytes_per_second = 0: no rate."""

    def __init__(
        self,
        connections: int = 0,
        login_connections: int = 0,
        bytes_per_second: int = 0,
        hours: str = "",
        *,
        clock: Callable[[], float] = time.monotonic,
        local_hour: Callable[[], int] = _local_hour,
    ) -> None:
        self.total = connections
        # copies leave `reserved` free for checks; 0 asks for half (a cap of 1 is shared: nothing to split)
        self.reserved = min(login_connections or connections // 2, max(0, connections - 1))
        self.rate = float(bytes_per_second)
        self.hours = parse_hours(hours)
        self.clock, self.local_hour = clock, local_hour
        self._cond = threading.Condition()
        self._in_use = dict.fromkeys(KINDS, 0)
        self._logins_waiting = 0  # checks waiting for a place: copies wait behind them
        self.peak = 0
        self.busy = dict.fromkeys(KINDS, 0)  # acquisitions that gave up (LegacyBusy)
        self._closed = False
        self._tokens = float(BURST)
        self._last = clock()
        self._rate_lock = threading.Lock()
        self.throttled_seconds = 0.0

    @classmethod
    def from_config(cls, limits: Any) -> LegacyLimiter:
        """From sidecar.config.LimitsConfig."""
        return cls(limits.legacy_connections, limits.legacy_login_connections, limits.legacy_bytes_per_second,
                   limits.throttle_hours)  # fmt: skip

    # --- connections -------------------------------------------------------------------------------------
    def in_use(self) -> dict[str, int]:
        with self._cond:
            return dict(self._in_use)

    def _fits(self, kind: str, ready: bool) -> bool:
        if self._closed:
            return False
        if not self.total:
            return True
        used = sum(self._in_use.values())
        if used >= self.total:
            return False
        if kind == "login":  # a ready (idle) one only within the reserved share
            return not ready or self._in_use["login"] < self.reserved
        copies = used - self._in_use["login"]
        return copies < self.total - self.reserved and not self._logins_waiting

    def acquire(self, kind: str, timeout: float | None = None, *, ready: bool = False) -> Permit:
        """A place for one connection of `kind`, waiting up to `timeout` seconds (default LOGIN_WAIT for
        "login", COPY_WAIT otherwise; 0: no wait). LegacyBusy when none came free."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        if timeout is None:
            timeout = LOGIN_WAIT if kind == "login" else COPY_WAIT
        deadline = time.monotonic() + timeout
        check = kind == "login" and not ready
        with self._cond:
            if not self._fits(kind, ready) and check:
                self._logins_waiting += 1
                try:
                    self._wait(kind, ready, deadline)
                finally:
                    self._logins_waiting -= 1
                    self._cond.notify_all()  # a copy waiting behind this check may fit now
            else:
                self._wait(kind, ready, deadline)
            self._in_use[kind] += 1
            self.peak = max(self.peak, sum(self._in_use.values()))
        return Permit(self, kind, ready)

    def _wait(self, kind: str, ready: bool, deadline: float) -> None:
        """Under the lock: until a place fits, or LegacyBusy at the deadline."""
        while not self._fits(kind, ready):
            left = deadline - time.monotonic()
            if left <= 0 or self._closed:
                self.busy[kind] += 1
                share = "" if kind == "login" else f" ({self.total - self.reserved} for copies)"
                raise LegacyBusy(f"all {self.total} connections toward the legacy server this node may open "
                                 f"are in use{share}: limits.legacy_connections")  # fmt: skip
            self._cond.wait(left)

    def _release(self, permit: Permit) -> None:
        with self._cond:
            self._in_use[permit.kind] = max(0, self._in_use[permit.kind] - 1)
            self._cond.notify_all()

    def close(self) -> None:
        """Shutting down: waiting acquisitions give up at once (LegacyBusy), new ones too."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # --- bytes ---------------------------------------------------------------------------------------------
    def throttling(self) -> bool:
        """Does the byte rate apply now (limits.throttle_hours)?"""
        if self.rate <= 0:
            return False
        if self.hours is None:
            return True
        start, end = self.hours
        hour = self.local_hour()
        return start <= hour < end if start < end else (hour >= start or hour < end)

    def throttle(self, nbytes: int, sleep: Callable[[float], None] = time.sleep) -> float:
        """The copier read `nbytes` from the legacy server: sleep as long as the node-wide rate asks (token
        bucket, BURST bytes ahead at most). Returns the seconds slept."""
        if nbytes <= 0 or not self.throttling():
            return 0.0
        with self._rate_lock:
            now = self.clock()
            self._tokens = min(float(BURST), self._tokens + (now - self._last) * self.rate) - nbytes
            self._last = now
            debt = -self._tokens
        if debt <= 0:
            return 0.0
        wait = debt / self.rate
        self.throttled_seconds += wait
        sleep(wait)
        return wait
