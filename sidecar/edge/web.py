"""The dashboard and /metrics, served by the sidecar on [dashboard] listen, inside the daemon's event loop.

Paths (GET or HEAD only; one request per connection, `Connection: close`):
    /              the dashboard: one server-rendered HTML page, no external assets, refreshes every 5 s
                   query: hours=1..168 (the chart's window, default 24)
    /api/summary   the same numbers as JSON (same query)
    /metrics       Prometheus text format, from a CollectorRegistry of our own (no query)
    /dashboard     the same page for browsers (a refusal asks for HTTP Basic credentials; same query)

More (the reasons and limits behind this module): docs/modules.md, sidecar/edge/web.py.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import socket
import time
import urllib.parse
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jinja2
from prometheus_client.exposition import generate_latest

from sidecar.edge.metrics import STATES, Collector, Sources

log = logging.getLogger("autoport.web")

MAX_HEAD = 8192  # request line + headers, bytes
MAX_LINE = 2048  # request line, bytes
MAX_HEADERS = 40
HEAD_TIMEOUT = 10.0  # seconds for the whole request head
WRITE_TIMEOUT = 30.0
MAX_CONNECTIONS = 32
SAMPLE_INTERVAL = 5.0  # seconds between copy-progress samples (copy rate)
REFRESH = 5  # seconds: the page reloads itself
MAX_HOURS = 168
PATHS = ("/", "/dashboard", "/api/summary", "/metrics")
# the classic text format: our metric and label names need no escaping, and every Prometheus reads it
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

# every answer: no caching, no framing, no sniffing, nothing loaded from anywhere (styles are inline)
SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
)


# --- codec ---------------------------------------------------------------------------------------------------
class HttpError(Exception):
    """A request we answer with an error status (and close)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    target: str  # as sent
    path: str
    query: str
    version: str
    headers: Mapping[str, str]  # lower-case names; a repeated header keeps its first value


@dataclasses.dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _token_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~")


def parse_head(head: bytes) -> Request:
    """Parse a request line and headers (ending in an empty line); HttpError for anything else."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "request head is not ASCII") from None
    lines = text.split("\r\n")
    if lines[-2:] != ["", ""]:
        raise HttpError(400, "request head does not end in an empty line")
    lines = lines[:-2]
    if not lines or not lines[0]:
        raise HttpError(400, "no request line")
    line = lines[0]
    if len(line) > MAX_LINE:
        raise HttpError(431, "request line too long")
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise HttpError(400, "request line is not 'METHOD TARGET HTTP/1.x'")
    method, target, version = parts
    if not all(_token_char(c) for c in method):
        raise HttpError(400, "bad method")
    if not version.startswith("HTTP/"):
        raise HttpError(400, "bad HTTP version")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1")
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
        raise HttpError(400, "request target must be an origin-form path")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too many header fields")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name, sep, value = raw.partition(":")
        if not sep or not name or not all(_token_char(c) for c in name):
            raise HttpError(400, "malformed header field")
        headers.setdefault(name.lower(), value.strip(" \t"))
    path, _, query = target.partition("?")
    return Request(method=method, target=target, path=path, query=query, version=version, headers=headers)


def encode_response(resp: Response, *, head_only: bool = False) -> bytes:
    reason = REASONS.get(resp.status, "Unknown")
    fields = [
        ("Content-Type", resp.content_type),
        ("Content-Length", str(len(resp.body))),
        ("Connection", "close"),
        *SECURITY_HEADERS,
        *resp.headers,
    ]
    head = f"HTTP/1.1 {resp.status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
    return head.encode("latin-1") + (b"" if head_only else resp.body)


# --- rendering -------------------------------------------------------------------------------------------------
_env = jinja2.Environment(
    loader=jinja2.PackageLoader("sidecar", "templates"),
    autoescape=True,  # addresses, errors and routes are attacker-influenced
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + " UTC" if t else "-"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


_env.filters["when"] = _fmt_time
_env.filters["size"] = _fmt_bytes

COLOURS = {"discovered": "#7f7f7f", "copying": "#1f77b4", "cutover": "#ff7f0e", "migrated": "#2ca02c",
           "failed": "#d62728"}  # fmt: skip
CHART_W, CHART_H, PAD_L, PAD_B, PAD_T = 640, 200, 40, 24, 10


def chart(hist: Mapping[str, Any]) -> dict[str, Any]:
    """Geometry of the accounts-per-state chart: one step line per state (numbers only, no markup)."""
    points = hist["points"]
    since, until = float(hist["since"]), float(hist["until"])
    if len(points) > 2 and not any(points[0]["states"].values()):
        # nothing before the first change: start shortly before it rather than show a long flat zero
        first = float(points[1]["at"])
        since = max(since, first - max(60.0, 0.05 * (until - first)))
    span = max(until - since, 1.0)
    top = int(max([1] + [max(p["states"].values(), default=0) for p in points]))
    top = math.ceil(top * 1.1) if top > 4 else top + 1
    w, h = CHART_W - PAD_L - 10, CHART_H - PAD_B - PAD_T

    def x(at: float) -> float:
        return round(PAD_L + (min(max(at, since), until) - since) / span * w, 1)

    def y(v: int) -> float:
        return round(PAD_T + h - v / top * h, 1)

    lines: list[dict[str, Any]] = []
    for state in STATES:
        coords: list[str] = []
        prev: int | None = None
        for p in points:
            v = int(p["states"].get(state, 0))
            if prev is not None and v != prev:
                coords.append(f"{x(p['at'])},{y(prev)}")  # step: hold the old value until the change
            coords.append(f"{x(p['at'])},{y(v)}")
            prev = v
        if coords:
            peak = max(int(p["states"].get(state, 0)) for p in points)
            lines.append({"state": state, "colour": COLOURS[state], "points": " ".join(coords), "peak": peak})
    lines.sort(key=lambda line: line["peak"])  # the lines that rise are drawn last, over the flat ones
    ticks = sorted({0, top // 2, top})
    return {
        "width": CHART_W,
        "height": CHART_H,
        "left": PAD_L,
        "right": CHART_W - 10,
        "top": PAD_T,
        "bottom": PAD_T + h,
        "lines": lines,
        "yticks": [{"y": y(t), "label": t} for t in ticks],
        "since": since,
        "until": until,
    }


def render_dashboard(snap: Mapping[str, Any], *, hours: int) -> bytes:
    tpl = _env.get_template("dashboard.html.j2")
    return tpl.render(
        s=snap, hours=hours, chart=chart(snap["history"]), colours=COLOURS, refresh=REFRESH, states=STATES
    ).encode("utf-8")


def render_refusal(*, configured: bool, reason: str) -> bytes:
    return _env.get_template("refused.html.j2").render(configured=configured, reason=reason).encode("utf-8")


# --- policy --------------------------------------------------------------------------------------------------
def check_token(headers: Mapping[str, str], token: str) -> bool:
    """Bearer TOKEN, or Basic with TOKEN as the password; constant-time comparison. False without a token."""
    if not token:
        return False
    value = headers.get("authorization", "")
    scheme, _, cred = value.partition(" ")
    cred = cred.strip()
    given = b""
    if scheme.lower() == "bearer":
        given = cred.encode("utf-8", "surrogateescape")
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(cred, validate=True)
        except (binascii.Error, ValueError):
            return False
        given = decoded.partition(b":")[2]
    else:
        return False
    return hmac.compare_digest(given, token.encode("utf-8"))


def parse_query(query: str, allowed: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """Integer parameters within their (min, max); HttpError 400 for anything else or a repeated name."""
    if not query:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True, max_num_fields=8)
    except ValueError:
        raise HttpError(400, "malformed query string") from None
    out: dict[str, int] = {}
    for name, value in pairs:
        if name not in allowed:
            raise HttpError(400, f"unknown query parameter {name[:40]!r}")
        if name in out:
            raise HttpError(400, f"query parameter {name!r} given twice")
        lo, hi = allowed[name]
        if not (value.isascii() and value.isdigit() and len(value) <= 6 and lo <= int(value) <= hi):
            raise HttpError(400, f"query parameter {name!r} must be an integer from {lo} to {hi}")
        out[name] = int(value)
    return out


class Dashboard:
    """Decides what each request gets; reads the collector on its own worker thread."""

    def __init__(self, token: str, collector: Collector) -> None:
        self.token = token
        self.collector = collector
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="web")

    async def _in_worker(self, fn: Any, *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kw))

    def refusal(self, req: Request, *, login: bool = False) -> Response:
        """401 with a page saying what to do; `login`: challenge with Basic, so that a browser asks."""
        configured = bool(self.token)
        reason = "no token sent" if "authorization" not in req.headers else "wrong token"
        realm = 'realm="autoport dashboard"'
        if not configured:
            challenge = [("WWW-Authenticate", f'Bearer {realm}, error="no token configured"')]
        elif login:
            challenge = [("WWW-Authenticate", f'Basic {realm}, charset="UTF-8"')]
        else:
            challenge = [("WWW-Authenticate", f"Bearer {realm}")]
        body = render_refusal(configured=configured, reason=reason)
        return Response(401, body, "text/html; charset=utf-8", challenge)

    async def handle(self, req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            raise HttpError(405, "only GET and HEAD")
        if req.headers.get("transfer-encoding") or req.headers.get("content-length", "0") not in ("", "0"):
            raise HttpError(400, "a request body is not accepted")
        if not check_token(req.headers, self.token):
            return self.refusal(req, login=req.path == "/dashboard")
        if req.path not in PATHS:
            raise HttpError(404, "no such page: try /, /dashboard, /api/summary or /metrics")
        if req.path == "/metrics":
            parse_query(req.query, {})
            body = await self._in_worker(generate_latest, self.collector.registry)
            return Response(200, body, METRICS_TYPE)
        hours = parse_query(req.query, {"hours": (1, MAX_HOURS)}).get("hours", 24)
        snap = await self._in_worker(self.collector.snapshot, hours=hours)
        if req.path == "/api/summary":
            body = json.dumps(snap, indent=1, sort_keys=True).encode("utf-8") + b"\n"
            return Response(200, body, "application/json")
        return Response(200, render_dashboard(snap, hours=hours), "text/html; charset=utf-8")

    async def sample_forever(self, interval: float = SAMPLE_INTERVAL) -> None:
        """Sample copy progress every `interval` seconds (the copy rate needs a history)."""
        while True:
            with contextlib.suppress(Exception):
                await self._in_worker(self.collector.sample)
            await asyncio.sleep(interval)

    def close(self) -> None:
        """Stop taking work; wait_closed() waits for the store call in progress (the store may close next)."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def wait_closed(self) -> None:
        await asyncio.to_thread(self.executor.shutdown, wait=True)


# --- server --------------------------------------------------------------------------------------------------
def parse_listen(listen: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port) (port 0: any free port); ValueError otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"dashboard listen must be host:port, not {listen!r}")
    return host.strip("[]"), int(port)


def _error_response(e: HttpError) -> Response:
    headers = [("Allow", "GET, HEAD")] if e.status == 405 else []
    return Response(e.status, f"{e.status} {REASONS.get(e.status, '')}: {e.message}\n".encode(), headers=headers)


class WebServer(asyncio.AbstractServer):
    """The listening dashboard server; close() also stops the sampler and the worker thread."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self._server: asyncio.AbstractServer | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._slots = MAX_CONNECTIONS
        self.stats = {"requests": 0, "errors": 0, "refused": 0}

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(getattr(self._server, "sockets", ()) or ())

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    async def _start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._client, host, port, limit=MAX_HEAD, reuse_address=True)
        self._sampler = asyncio.get_running_loop().create_task(self.dashboard.sample_forever())

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._slots <= 0:
                self.stats["refused"] += 1
                await self._send(writer, Response(503, b"too many connections\n"))
                return
            self._slots -= 1
            try:
                await self._serve_one(reader, writer)
            finally:
                self._slots += 1
        except Exception:
            log.exception("dashboard: unexpected error")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_only = False
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except asyncio.IncompleteReadError:
                return  # the peer went away before a complete head: nobody to answer
            except asyncio.LimitOverrunError:
                raise HttpError(431, f"request head over {MAX_HEAD} bytes") from None
            except TimeoutError:
                raise HttpError(408, f"no complete request head within {HEAD_TIMEOUT:.0f} s") from None
            req = parse_head(head)
            head_only = req.method == "HEAD"
            self.stats["requests"] += 1
            resp = await self.dashboard.handle(req)
            log.debug("dashboard %s %s -> %d", req.method, req.path, resp.status)
        except HttpError as e:
            self.stats["errors"] += 1
            resp = _error_response(e)
        except Exception:
            log.exception("dashboard: error while answering")
            resp = Response(500, b"internal error; see the sidecar's log\n")
        await self._send(writer, resp, head_only=head_only)

    async def _send(self, writer: asyncio.StreamWriter, resp: Response, *, head_only: bool = False) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError):
            writer.write(encode_response(resp, head_only=head_only))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)

    # asyncio.AbstractServer
    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._sampler is not None:
            self._sampler.cancel()
        self.dashboard.close()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        assert self._server is not None
        return self._server.get_loop()

    def is_serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start_serving(self) -> None:
        assert self._server is not None
        await self._server.start_serving()

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
        if self._sampler is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        await self.dashboard.wait_closed()


async def start_web_server(listen: str, token: str, sources: Sources) -> WebServer:
    """Listen on `listen` (host:port; port 0 picks a free one: see .port). OSError when it cannot bind."""
    host, port = parse_listen(listen)
    server = WebServer(Dashboard(token, Collector(sources)))
    await server._start(host, port)
    if not token:
        log.warning("dashboard on %s refuses every request: set [dashboard] token to use it", listen)
    return server
