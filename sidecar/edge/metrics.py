"""The numbers behind the dashboard and /metrics, gathered from the store and the daemon's own counters.

Collector.snapshot() is the dashboard's (and /api/summary's) view: accounts per state now and over time
(rebuilt from transition events), migrations in flight, copy rate, recent failures, recent changes, mail
still relayed to the legacy server. Collector.registry is a prometheus_client CollectorRegistry of our own
(nothing from the process-global default registry) whose collect() reads the same sources.

More (the reasons and limits behind this module): docs/modules.md, sidecar/edge/metrics.py.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as PromCollector
from prometheus_client.registry import CollectorRegistry

from sidecar.config import Config
from sidecar.states import State
from sidecar.store.base import Account, Event, Store, StoreError

RATE_WINDOW = 300.0  # seconds of progress samples behind the copy rate
EVENT_LIMIT = 5000  # newest events read to draw accounts per state over time
MESSAGE_LOG_LIMIT = 20000  # newest message-log rows read for "relayed to legacy"
LIST_LIMIT = 50  # rows per table on the page (in flight, failures, relayed recipients)
RECENT_EVENTS = 20
HISTORY_POINTS = 240  # at most this many points per chart line
RELAY_WINDOW = 24 * 3600.0

_TRANSITION = re.compile(r"^(\(none\)|[a-z]+) -> ([a-z]+)")
STATES = tuple(s.value for s in State)


class CounterSource(Protocol):
    """Anything with a `stats` attribute (JobRunner: a dict; socketmap server: a Stats object)."""

    stats: Any


@dataclasses.dataclass
class Sources:
    """Where the numbers come from; the daemon fills in each piece as it starts it (None: not running)."""

    cfg: Config
    store: Store
    runner: CounterSource | None = None  # sidecar.migration.jobs.JobRunner
    socketmap: Any = None  # sidecar.edge.socketmap.Stats
    milter: Callable[[], Mapping[str, int]] | None = None  # sidecar.edge.milter.stats.snapshot
    legacy: Any = None  # sidecar.legacy.limit.LegacyLimiter: connections toward the legacy server
    clock: Callable[[], float] = time.time


def _legacy_route(route: str, transport: str) -> bool:
    return route == transport or route.startswith(transport + ":")


def _percent(done: int, total: int) -> float:
    if total <= 0:
        return 0.0
    return round(min(100.0, 100.0 * done / total), 1)


def history(current: Mapping[str, int], events: Iterable[Event], *, since: float, until: float) -> dict[str, Any]:
    """Accounts per state over [since, until], walking transition events back from the current counts.

    `events` newest first (as Store.events returns them). Returns {"since", "until", "complete", "points":
    [{"at", "states"}]} oldest first; "complete" is False when the events ran out before `since` (older
    history was not read), and the first point is then the oldest event read.
    """
    counts = {s: int(current.get(s, 0)) for s in STATES}
    points: list[tuple[float, dict[str, int]]] = [(until, dict(counts))]
    complete = True
    oldest = until
    n = 0
    for ev in events:
        n += 1
        if ev.at < since:
            break
        if ev.kind != "transition":
            continue
        m = _TRANSITION.match(ev.detail)
        if not m:
            continue
        old, new = m.group(1), m.group(2)
        points.append((ev.at, dict(counts)))  # the counts right after this event
        if new in counts:
            counts[new] -= 1
        if old in counts:
            counts[old] += 1
        oldest = ev.at
    else:
        complete = n < EVENT_LIMIT
    start = since if complete else oldest
    points.append((start, {s: max(0, v) for s, v in counts.items()}))
    points.reverse()
    # one point per time bucket (the last of each), so the chart stays small whatever happened
    span = max(until - start, 1e-9)
    bucketed: dict[int, tuple[float, dict[str, int]]] = {}
    for at, c in points:
        bucketed[min(HISTORY_POINTS - 1, int((at - start) / span * (HISTORY_POINTS - 1)))] = (at, c)
    kept = [bucketed[k] for k in sorted(bucketed)]
    if kept[0][0] != start:
        kept.insert(0, points[0])
    return {
        "since": start,
        "until": until,
        "complete": complete,
        "points": [{"at": at, "states": {s: max(0, v) for s, v in c.items()}} for at, c in kept],
    }


class Collector:
    """Reads the sources for the dashboard and for Prometheus; thread-safe."""

    def __init__(self, sources: Sources, *, rate_window: float = RATE_WINDOW) -> None:
        self.sources = sources
        self.rate_window = rate_window
        self.store_ok = True
        self.store_error = ""
        self._lock = threading.Lock()
        # (time, {address: (messages_copied, bytes_copied)}) of accounts in copying/cutover
        self._samples: collections.deque[tuple[float, dict[str, tuple[int, int]]]] = collections.deque()
        self._increases: collections.deque[tuple[float, int, int]] = collections.deque()  # (time, messages, bytes)
        self.copied_messages = 0  # increases seen by this process (Prometheus counters)
        self.copied_bytes = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_PromBridge(self))

    # --- store access ----------------------------------------------------------------------------------
    def _store(self, call: Callable[[], Any]) -> Any:
        try:
            result = call()
        except StoreError as e:
            with self._lock:
                self.store_ok, self.store_error = False, str(e) or type(e).__name__
            raise
        with self._lock:
            self.store_ok, self.store_error = True, ""
        return result

    def in_flight(self) -> list[Account]:
        store = self.sources.store
        return self._store(lambda: [*store.accounts(State.COPYING), *store.accounts(State.CUTOVER)])  # type: ignore[no-any-return]

    # --- copy rate -------------------------------------------------------------------------------------
    def sample(self, accounts: list[Account] | None = None) -> None:
        """Record the progress of the accounts in flight (StoreError when the store cannot answer)."""
        accounts = self.in_flight() if accounts is None else accounts
        now = self.sources.clock()
        current = {a.address: (a.messages_copied, a.bytes_copied) for a in accounts}
        with self._lock:
            if self._samples:
                previous = self._samples[-1][1]
                messages = bytes_ = 0
                for address, (m, b) in current.items():
                    if address in previous:  # new accounts are a baseline: their earlier progress is not ours
                        messages += max(0, m - previous[address][0])
                        bytes_ += max(0, b - previous[address][1])
                self._increases.append((now, messages, bytes_))
                self.copied_messages += messages
                self.copied_bytes += bytes_
            self._samples.append((now, current))
            while len(self._samples) > 1 and self._samples[0][0] < now - self.rate_window:
                self._samples.popleft()
            while self._increases and self._increases[0][0] < now - self.rate_window:
                self._increases.popleft()

    def copy_rate(self) -> dict[str, float]:
        with self._lock:
            if len(self._samples) < 2:
                return {"messages_per_second": 0.0, "bytes_per_second": 0.0, "window_seconds": 0.0}
            first = self._samples[0][0]
            seconds = max(self._samples[-1][0] - first, 1e-9)
            messages = sum(m for t, m, _ in self._increases if t > first)
            bytes_ = sum(b for t, _, b in self._increases if t > first)
        return {
            "messages_per_second": round(messages / seconds, 2),
            "bytes_per_second": round(bytes_ / seconds, 1),
            "window_seconds": round(seconds, 1),
        }

    # --- the dashboard's numbers -----------------------------------------------------------------------
    def snapshot(self, *, hours: int = 24) -> dict[str, Any]:
        """Everything the page shows, JSON-ready. Never raises StoreError: see store_ok/store_error."""
        now = self.sources.clock()
        snap: dict[str, Any] = {
            "generated_at": now,
            "store_ok": True,
            "store_error": "",
            "states": {s: 0 for s in STATES},
            "total": 0,
            "history": {"since": now - hours * 3600, "until": now, "complete": True, "points": []},
            "in_flight": [],
            "in_flight_count": 0,
            "copy_rate": self.copy_rate(),
            "failures": [],
            "failed_count": 0,
            "recent": [],
            "legacy_relay": {
                "hours": RELAY_WINDOW / 3600,
                "messages": 0,
                "recipient_count": 0,
                "recipients": [],
                "truncated": False,
            },
            "jobs": {},
        }
        store = self.sources.store
        try:
            states = self._store(store.summary)
            snap["states"] = {s: int(states.get(s, 0)) for s in STATES}
            snap["total"] = sum(snap["states"].values())
            events = self._store(lambda: store.events(limit=EVENT_LIMIT))
            snap["history"] = history(snap["states"], events, since=now - hours * 3600, until=now)
            snap["recent"] = [
                {"at": e.at, "address": e.address, "kind": e.kind, "detail": e.detail} for e in events[:RECENT_EVENTS]
            ]
            flying = self.in_flight()
            self.sample(flying)
            snap["copy_rate"] = self.copy_rate()
            flying.sort(key=lambda a: (-_percent(a.messages_copied, a.messages_total), a.address))
            snap["in_flight_count"] = len(flying)
            snap["in_flight"] = [
                {
                    "address": a.address,
                    "state": a.state.value,
                    "messages_copied": a.messages_copied,
                    "messages_total": a.messages_total,
                    "bytes_copied": a.bytes_copied,
                    "percent": _percent(a.messages_copied, a.messages_total),
                }
                for a in flying[:LIST_LIMIT]
            ]
            failed = sorted(self._store(lambda: list(store.accounts(State.FAILED))), key=lambda a: -a.updated_at)
            snap["failed_count"] = len(failed)
            snap["failures"] = [
                {"address": a.address, "last_error": a.last_error, "attempts": a.attempts, "at": a.updated_at}
                for a in failed[:LIST_LIMIT]
            ]
            snap["legacy_relay"] = self._legacy_relay(now)
            snap["jobs"] = self._jobs()
        except StoreError:
            pass
        with self._lock:
            snap["store_ok"], snap["store_error"] = self.store_ok, self.store_error
        return snap

    def _legacy_relay(self, now: float) -> dict[str, Any]:
        rows = self._store(lambda: self.sources.store.message_log(limit=MESSAGE_LOG_LIMIT))
        transport = self.sources.cfg.target.legacy_transport
        since = now - RELAY_WINDOW
        per: dict[str, dict[str, Any]] = {}
        total = 0
        for r in rows:  # newest (by id) first; `at` is the milter's clock, so look at every row read
            if r.at < since:
                continue
            if not _legacy_route(r.route, transport):
                continue
            total += 1
            e = per.setdefault(r.recipient, {"recipient": r.recipient, "messages": 0, "bytes": 0, "last_at": r.at})
            e["messages"] += 1
            e["bytes"] += r.size
            e["last_at"] = max(e["last_at"], r.at)
        recipients = sorted(per.values(), key=lambda e: (-e["messages"], e["recipient"]))
        return {
            "hours": RELAY_WINDOW / 3600,
            "messages": total,
            "recipient_count": len(recipients),
            "recipients": recipients[:LIST_LIMIT],
            # the newest rows read were all inside the window: older ones in it may exist
            "truncated": len(rows) >= MESSAGE_LOG_LIMIT and bool(rows) and rows[-1].at >= since,
        }

    def _jobs(self) -> dict[str, int]:
        counts: collections.Counter[str] = collections.Counter()
        for job in self._store(self.sources.store.jobs):
            counts[job.status] += 1
        return dict(sorted(counts.items()))

    # --- Prometheus ------------------------------------------------------------------------------------
    def metrics(self) -> Iterator[Metric]:
        store = self.sources.store
        up = GaugeMetricFamily("autoport_store_up", "1 if the last state store call of the dashboard worked")
        try:
            states = self._store(store.summary)
            accounts = GaugeMetricFamily("autoport_accounts", "Accounts per state", labels=["state"])
            for s in STATES:
                accounts.add_metric([s], int(states.get(s, 0)))
            yield accounts
            jobs = GaugeMetricFamily(
                "autoport_jobs", "Jobs in the store per kind and status", labels=["kind", "status"]
            )
            counts: collections.Counter[tuple[str, str]] = collections.Counter()
            for job in self._store(store.jobs):
                counts[(job.kind, job.status)] += 1
            for (kind, status), n in sorted(counts.items()):
                jobs.add_metric([kind, status], n)
            yield jobs
            flying = self.in_flight()
            self.sample(flying)
            inflight = GaugeMetricFamily(
                "autoport_copy_in_flight_messages",
                "Messages of the accounts in copying/cutover, copied so far and in total",
                labels=["kind"],
            )
            inflight.add_metric(["copied"], sum(a.messages_copied for a in flying))
            inflight.add_metric(["total"], sum(a.messages_total for a in flying))
            yield inflight
        except StoreError:
            pass
        with self._lock:
            up.add_metric([], 1 if self.store_ok else 0)
            copied_messages, copied_bytes = self.copied_messages, self.copied_bytes
        yield up
        yield _counter("autoport_copied_messages", "Messages copied (store progress seen by this sidecar)",
                       copied_messages)  # fmt: skip
        yield _counter("autoport_copied_bytes", "Bytes copied (store progress seen by this sidecar)", copied_bytes)
        runner = self.sources.runner
        if runner is not None:
            outcomes = CounterMetricFamily("autoport_copy_jobs", "Copy job runs by outcome", labels=["outcome"])
            for outcome, n in sorted(dict(runner.stats).items()):
                outcomes.add_metric([outcome], n)
            yield outcomes
        if self.sources.milter is not None:
            snap = self.sources.milter()
            for name, help_ in (
                ("messages", "Messages the milter saw"),
                ("records", "Message-log records written"),
                ("dropped", "Message-log records lost (queue full, store error, milter fault)"),
                ("errors", "Milter callbacks that raised (the message still went through)"),
            ):
                yield _counter(f"autoport_milter_{name}", help_, snap.get(name, 0))
        legacy = self.sources.legacy
        if legacy is not None:
            conns = GaugeMetricFamily("autoport_legacy_connections",
                                      "Connections this sidecar holds toward the legacy server, per kind (login: "
                                      "password checks and the ones kept ready; imap, pop3, sieve: copies)",
                                      labels=["kind"])  # fmt: skip
            for kind, n in legacy.in_use().items():
                conns.add_metric([kind], n)
            yield conns
            peak = GaugeMetricFamily("autoport_legacy_connections_peak",
                                     "Most connections toward the legacy server held at once since the start")
            peak.add_metric([], legacy.peak)
            yield peak
            busy = CounterMetricFamily("autoport_legacy_busy", "Connections toward the legacy server not opened "
                                       "because limits.legacy_connections was reached, per kind", labels=["kind"])
            for kind, n in sorted(dict(legacy.busy).items()):
                busy.add_metric([kind], n)
            yield busy
            yield _counter("autoport_legacy_throttled_seconds",
                           "Seconds copies slept for limits.legacy_bytes_per_second", legacy.throttled_seconds)
        sm = self.sources.socketmap
        if sm is not None:
            for name, help_ in (
                ("connections", "Socketmap connections accepted"),
                ("requests", "Socketmap requests answered"),
                ("cache_hits", "Socketmap answers from the cache"),
                ("malformed", "Malformed socketmap requests"),
                ("timeouts", "Socketmap requests answered TEMP after the request timeout"),
                ("restarts", "Socketmap worker processes started again after they died"),
            ):
                yield _counter(f"autoport_socketmap_{name}", help_, getattr(sm, name, 0))


def _counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, help_)
    c.add_metric([], value)
    return c


class _PromBridge(PromCollector):
    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def collect(self) -> Iterable[Metric]:
        return list(self.collector.metrics())
