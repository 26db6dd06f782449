"""The dashboard and /metrics on a real socket, over a real SQLite store: what a person (or Prometheus, or an
attacker) gets back for each kind of request."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from harness.waiting import wait_for
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import Config
from sidecar.edge import web
from sidecar.edge.metrics import Collector, Sources, history
from sidecar.edge.milter import MilterStats
from sidecar.edge.socketmap import Stats as SocketmapStats
from sidecar.legacy.limit import LegacyLimiter
from sidecar.states import State
from sidecar.store import open_store
from sidecar.store.base import Event, MessageRecord, Store, StoreUnavailable

TOKEN = "s3cret-dashboard-token"
HOSTILE = '<script>alert("addr")</script>@example.test'
HOSTILE_ERROR = "<script>alert('err')</script> & <img src=x onerror=alert(1)>"
NOW = time.time()


def populate(store: Store) -> None:
    store.transition("ann@example.test", State.COPYING)
    store.transition("ann@example.test", State.CUTOVER)
    store.transition("ann@example.test", State.MIGRATED)
    store.transition("bob@example.test", State.COPYING)
    store.set_progress("bob@example.test", total=200, copied=50, bytes_copied=5 * 1024 * 1024)
    store.transition("cy@example.test", State.DISCOVERED)
    store.transition(HOSTILE, State.COPYING)
    store.transition(HOSTILE, State.FAILED, reason="copy keeps failing")
    store.set_error(HOSTILE, HOSTILE_ERROR)
    store.enqueue("bob@example.test")
    relay = "legacy:[192.0.2.25]:25"
    store.log_messages(
        [
            MessageRecord("Q1", "cy@example.test", "s@x.test", "<1@x>", relay, 1000, at=NOW - 60),
            MessageRecord("Q2", "cy@example.test", "s@x.test", "<2@x>", relay, 3000, at=NOW - 30),
            MessageRecord("Q3", HOSTILE, "s@x.test", "<3@x>", relay, 500, at=NOW - 20),
            MessageRecord("Q4", "ann@example.test", "s@x.test", "<4@x>", "lmtp:private/dovecot-lmtp", 700),
            MessageRecord("Q5", "bob@example.test", "s@x.test", "<5@x>", "retry", 700),
            MessageRecord("Q0", "old@example.test", "s@x.test", "<0@x>", relay, 10, at=NOW - 2 * 86400),
        ]
    )


class Running:
    """start_web_server in an event loop on a thread of its own; plain clients talk to it from the test."""

    def __init__(self, sources: Sources, token: str = TOKEN) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: web.WebServer = self.call(web.start_web_server("127.0.0.1:0", token, sources))
        self.port = self.server.port

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _close(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    def stop(self) -> None:
        self.call(self._close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, Any, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read().decode("utf-8")
        finally:
            conn.close()

    def raw(self, data: bytes, *, chunk: int = 0) -> bytes:
        """Send bytes as they are (in `chunk`-sized pieces when given); what came back until the server closed."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
            try:
                for p in pieces:
                    s.sendall(p)
                s.shutdown(socket.SHUT_WR)  # our side is done (the server still answers)
            except OSError:
                pass  # the server answered and closed before reading everything: fine
            out = b""
            try:
                while block := s.recv(65536):
                    out += block
            except ConnectionResetError:
                pass
            return out


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(password: str, user: str = "admin") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    st.init()
    populate(st)
    yield st
    st.close()


@pytest.fixture
def sources(store: Store) -> Sources:
    cfg = Config()
    cfg.legacy.host = "192.0.2.25"
    sm = SocketmapStats()
    sm.requests, sm.connections = 7, 3
    milter = MilterStats()
    milter.add(messages=5, records=9, dropped=1)

    class Runner:
        stats = {"started": 4, "migrated": 2, "retried": 1, "failed": 1, "waiting": 0}

    legacy = LegacyLimiter(4)
    legacy.acquire("imap", 0), legacy.acquire("login", 0), legacy.acquire("login", 0)
    with legacy.acquire("sieve", 0):
        pass
    return Sources(cfg, store, runner=Runner(), socketmap=sm, milter=milter.snapshot, legacy=legacy)


@pytest.fixture
def server(sources: Sources) -> Iterator[Running]:
    r = Running(sources)
    yield r
    r.stop()


# --- authentication ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/", "/api/summary", "/metrics", "/no-such-page"])
def test_without_a_token_every_path_is_refused_with_a_page_saying_what_to_do(server: Running, path: str) -> None:
    status, headers, body = server.get(path)
    assert status == 401
    assert headers.get_all("WWW-Authenticate") == ['Bearer realm="autoport dashboard"']  # no password dialog
    assert "token required" in body and "Authorization: Bearer TOKEN" in body
    assert '<a href="/dashboard">/dashboard</a>' in body
    assert "bob@example.test" not in body


def test_the_browser_page_asks_for_basic_credentials(server: Running) -> None:
    status, headers, body = server.get("/dashboard")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Basic realm="autoport dashboard", charset="UTF-8"'
    assert "token required" in body
    status, _, body = server.get("/dashboard?hours=6", basic(TOKEN))
    assert status == 200 and "bob@example.test" in body and "last 6 h" in body


@pytest.mark.parametrize(
    "headers",
    [
        bearer("wrong"),
        bearer(TOKEN + "x"),
        bearer(""),
        basic("wrong"),
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": f"Token {TOKEN}"},
        {"Authorization": TOKEN},
    ],
)
def test_a_wrong_token_is_refused(server: Running, headers: dict[str, str]) -> None:
    status, _, body = server.get("/", headers)
    assert status == 401
    assert "wrong token" in body
    assert "ann@example.test" not in body


@pytest.mark.parametrize("headers", [bearer(), basic(TOKEN), basic(TOKEN, user="")])
def test_the_token_as_bearer_or_basic_password_opens_the_page(server: Running, headers: dict[str, str]) -> None:
    status, h, body = server.get("/", headers)
    assert status == 200
    assert h["Content-Type"] == "text/html; charset=utf-8"
    assert h["Cache-Control"] == "no-store"
    assert "default-src 'none'" in h["Content-Security-Policy"]
    assert '<meta http-equiv="refresh" content="5">' in body
    assert "bob@example.test" in body


def test_no_configured_token_refuses_everything_and_says_how_to_set_one(sources: Sources) -> None:
    r = Running(sources, token="")
    try:
        for headers in ({}, bearer(""), basic(""), bearer(TOKEN)):
            status, h, body = r.get("/", headers)
            assert status == 401
            assert "No dashboard token is configured" in body
            assert "[dashboard]" in body and "token =" in body
            assert "Basic" not in h["WWW-Authenticate"]  # no login prompt: nothing could succeed
        status, _, _ = r.get("/metrics")
        assert status == 401
    finally:
        r.stop()


# --- what the page shows -------------------------------------------------------------------------------------
def test_page_shows_states_progress_failures_and_legacy_relay(server: Running) -> None:
    _, _, body = server.get("/", bearer())
    # accounts per state: one each in migrated, copying, discovered, failed
    for state, n in (("discovered", 1), ("copying", 1), ("cutover", 0), ("migrated", 1), ("failed", 1)):
        assert f'<div class="tile t-{state}"><span>{state}</span><b>{n}</b></div>' in body
    assert "<span>total</span><b>4</b>" in body
    assert "<svg" in body and "<polyline" in body
    # in flight: bob at 50 of 200 messages
    assert "Migrations in flight (1)" in body
    assert '<progress max="200" value="50">25.0 %</progress>' in body
    assert "50 / 200" in body and "5.0 MiB" in body
    # failures and relayed mail
    assert "Recent failures (1)" in body
    assert "Mail still relayed to the legacy server (last 24 h): 3 messages" in body
    assert 'cy@example.test</td><td class="n">2</td>' in body
    assert "old@example.test" not in body  # two days ago: outside the window
    assert "ann@example.test</td><td>transition</td>" in body  # recent changes


def test_hostile_addresses_and_errors_are_escaped(server: Running) -> None:
    _, _, body = server.get("/", bearer())
    assert "<script>" not in body
    assert "<img" not in body
    assert "&lt;script&gt;alert(&#34;addr&#34;)&lt;/script&gt;@example.test" in body
    assert "&lt;script&gt;alert(&#39;err&#39;)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(1)&gt;" in body


def test_dashboard_never_shows_password_hashes(server: Running, store: Store) -> None:
    store.set_password_hash("bob@example.test", "{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g")
    for path in ("/", "/api/summary", "/metrics"):
        _, _, body = server.get(path, bearer())
        assert "argon2id" not in body and "ARGON2ID" not in body


def test_api_summary_has_the_same_numbers(server: Running) -> None:
    status, h, body = server.get("/api/summary", bearer())
    assert status == 200 and h["Content-Type"] == "application/json"
    s = json.loads(body)
    assert s["states"] == {"discovered": 1, "copying": 1, "cutover": 0, "migrated": 1, "failed": 1}
    assert s["total"] == 4 and s["store_ok"] is True
    assert s["in_flight"] == [
        {"address": "bob@example.test", "state": "copying", "messages_copied": 50, "messages_total": 200,
         "bytes_copied": 5 * 1024 * 1024, "percent": 25.0}
    ]  # fmt: skip
    assert [(f["address"], f["last_error"]) for f in s["failures"]] == [(HOSTILE, HOSTILE_ERROR)]
    relay = s["legacy_relay"]
    assert relay["messages"] == 3
    assert [(r["recipient"], r["messages"], r["bytes"]) for r in relay["recipients"]] == [
        ("cy@example.test", 2, 4000),
        (HOSTILE, 1, 500),
    ]
    assert s["jobs"] == {"queued": 1}
    assert s["history"]["points"][-1]["states"] == s["states"]


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("?hours=48", 200),
        ("?hours=1", 200),
        ("?hours=168", 200),
        ("?hours=0", 400),
        ("?hours=169", 400),
        ("?hours=abc", 400),
        ("?hours=-1", 400),
        ("?hours=", 400),
        ("?hours=1&hours=2", 400),
        ("?user=ann", 400),
        ("?a&b", 400),
        ("?" + "&".join(f"x{i}=1" for i in range(20)), 400),
    ],
)
def test_query_parameters_are_validated(server: Running, query: str, status: int) -> None:
    got, _, body = server.get("/" + query, bearer())
    assert got == status
    if status == 200:
        assert f"last {query.split('=')[1]} h" in body
    else:
        assert body.startswith("400 Bad Request")
    assert server.get("/metrics?hours=1", bearer())[0] == 400


def test_head_answers_headers_only(server: Running) -> None:
    out = server.raw(f"HEAD / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: " in head and not head.endswith(b"Content-Length: 0")
    assert body == b""


# --- metrics -------------------------------------------------------------------------------------------------
def metrics(server: Running) -> dict[str, float]:
    status, h, body = server.get("/metrics", bearer())
    assert status == 200
    assert h["Content-Type"].startswith("text/plain; version=0.0.4")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def test_metrics_parse_and_carry_the_numbers(server: Running) -> None:
    m = metrics(server)
    assert m["autoport_accounts{state=migrated}"] == 1
    assert m["autoport_accounts{state=cutover}"] == 0
    assert m["autoport_jobs{kind=copy,status=queued}"] == 1
    assert m["autoport_copy_in_flight_messages{kind=copied}"] == 50
    assert m["autoport_copy_in_flight_messages{kind=total}"] == 200
    assert m["autoport_store_up"] == 1
    assert m["autoport_copy_jobs_total{outcome=migrated}"] == 2
    assert m["autoport_milter_records_total"] == 9
    assert m["autoport_milter_dropped_total"] == 1
    assert m["autoport_socketmap_requests_total"] == 7
    assert "autoport_copied_messages_total" in m
    assert m["autoport_legacy_connections{kind=login}"] == 2 and m["autoport_legacy_connections{kind=imap}"] == 1
    assert m["autoport_legacy_connections{kind=sieve}"] == 0 and m["autoport_legacy_connections_peak"] == 4
    assert not any(k.startswith("python_") or k.startswith("process_") for k in m)  # our own registry only


def test_copied_counters_follow_store_progress(server: Running, store: Store) -> None:
    before = metrics(server)["autoport_copied_messages_total"]
    store.set_progress("bob@example.test", copied=120, bytes_copied=6 * 1024 * 1024)
    m = metrics(server)
    assert m["autoport_copied_messages_total"] == before + 70
    assert m["autoport_copied_bytes_total"] >= 1024 * 1024


class DownStore:
    def __getattr__(self, name: str) -> Any:
        def fail(*a: Any, **kw: Any) -> Any:
            raise StoreUnavailable("database is locked")

        return fail


def test_store_outage_shows_on_the_page_and_in_metrics() -> None:
    r = Running(Sources(Config(), cast(Store, DownStore())))
    try:
        status, _, body = r.get("/", bearer())
        assert status == 200
        assert "The state store is unavailable:</b> database is locked" in body
        m = metrics(r)
        assert m["autoport_store_up"] == 0
        assert "autoport_accounts{state=migrated}" not in m
        assert json.loads(r.get("/api/summary", bearer())[2])["store_ok"] is False
    finally:
        r.stop()


# --- bad input -----------------------------------------------------------------------------------------------
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
GARBAGE = [
    (b"\x00\xff\xfe garbage\r\n\r\n", b"400"),
    (b"GET /\r\n\r\n", b"400"),
    (b"GET  / HTTP/1.1\r\n\r\n", b"400"),
    (b"GET http://evil.test/ HTTP/1.1\r\n\r\n", b"400"),
    (b"GET / HTTP/2.0\r\n\r\n", b"505"),
    (b"GET / FTP/1.0\r\n\r\n", b"400"),
    (b"G(T / HTTP/1.1\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nX-\xe9t\xe9: 1\r\n\r\n", b"400"),
    (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n", b"431"),
    (b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(50)) + b"\r\n", b"431"),
    (b"POST / HTTP/1.1\r\n" + AUTH + b"Content-Length: 3\r\n\r\nabc", b"405"),
    (b"DELETE / HTTP/1.1\r\n" + AUTH + b"\r\n", b"405"),
    (b"GET / HTTP/1.1\r\n" + AUTH + b"Content-Length: 5\r\n\r\nhello", b"400"),
    (b"GET / HTTP/1.1\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400"),
    (b"GET /../../etc/passwd HTTP/1.1\r\n" + AUTH + b"\r\n", b"404"),
    (b"GET /api/summary/ HTTP/1.1\r\n" + AUTH + b"\r\n", b"404"),
]


@pytest.mark.parametrize(("request_bytes", "status"), GARBAGE)
def test_garbage_gets_an_error_and_the_server_keeps_serving(
    server: Running, request_bytes: bytes, status: bytes
) -> None:
    out = server.raw(request_bytes)
    assert out.startswith(b"HTTP/1.1 " + status + b" "), out[:200]
    assert b"Connection: close" in out
    assert server.get("/", bearer())[0] == 200


def test_allow_header_on_405(server: Running) -> None:
    out = server.raw(b"PUT / HTTP/1.1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD\r\n" in out


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_a_request_fed_in_small_pieces_is_answered(server: Running, chunk: int) -> None:
    out = server.raw(b"GET /api/summary HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n", chunk=chunk)
    assert out.startswith(b"HTTP/1.1 200 OK")
    assert json.loads(out.partition(b"\r\n\r\n")[2])["total"] == 4


def test_a_peer_that_goes_away_or_goes_silent(server: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    assert server.raw(b"GET / HTT") == b""  # closed mid-head: nobody to answer
    monkeypatch.setattr(web, "HEAD_TIMEOUT", 0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 408 ")
    assert server.get("/", bearer())[0] == 200


def test_too_many_connections_get_503(sources: Sources, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web, "MAX_CONNECTIONS", 2)
    r = Running(sources)
    idle = [socket.create_connection(("127.0.0.1", r.port), timeout=10) for _ in range(2)]
    try:
        wait_for(lambda: r.server._slots == 0, 5, "both slots taken", interval=0.02)
        assert r.raw(b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 503 ")
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: r.server._slots == 2, 5, "both slots free", interval=0.02)
    assert r.get("/", bearer())[0] == 200
    r.stop()


# --- pure pieces ---------------------------------------------------------------------------------------------
def ev(i: int, at: float, detail: str, kind: str = "transition") -> Event:
    return Event(id=i, at=at, address=f"u{i}@x.test", kind=kind, detail=detail)


def test_history_walks_transitions_back_from_the_current_counts() -> None:
    now = 10_000.0
    current = {"discovered": 0, "copying": 1, "cutover": 0, "migrated": 1, "failed": 0}
    events = [  # newest first
        ev(4, 9_000, "cutover -> migrated"),
        ev(3, 8_000, "copying -> cutover: initial copy done"),
        ev(9, 7_500, "", kind="failure"),
        ev(2, 7_000, "(none) -> copying"),
        ev(1, 6_000, "(none) -> copying"),
        ev(0, 1_000, "(none) -> discovered"),  # before the window
    ]
    h = history(current, events, since=5_000, until=now)
    assert h["complete"] is True
    got = [(p["at"], p["states"]["copying"], p["states"]["cutover"], p["states"]["migrated"]) for p in h["points"]]
    assert got == [
        (5_000, 0, 0, 0),
        (6_000, 1, 0, 0),
        (7_000, 2, 0, 0),
        (8_000, 1, 1, 0),
        (9_000, 1, 0, 1),
        (10_000, 1, 0, 1),
    ]


def test_copy_rate_from_progress_samples(store: Store) -> None:
    clock = [1000.0]
    c = Collector(Sources(Config(), store, clock=lambda: clock[0]))
    c.sample()
    assert c.copy_rate()["messages_per_second"] == 0  # a baseline only
    clock[0] += 10
    store.set_progress("bob@example.test", copied=150, bytes_copied=6 * 1024 * 1024)
    c.sample()
    rate = c.copy_rate()
    assert rate["messages_per_second"] == 10.0 and rate["window_seconds"] == 10
    assert rate["bytes_per_second"] == pytest.approx(1024 * 1024 / 10, rel=0.01)
    clock[0] += 1000  # nothing new for a long time: the window forgets the burst
    c.sample()
    assert c.copy_rate()["messages_per_second"] == 0


def test_parse_listen() -> None:
    assert web.parse_listen("127.0.0.1:8025") == ("127.0.0.1", 8025)
    assert web.parse_listen("[::1]:8025") == ("::1", 8025)
    for bad in ("8025", "localhost", "host:http", "host:70000", ":80"):
        with pytest.raises(ValueError):
            web.parse_listen(bad)
