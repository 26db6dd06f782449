"""What the login benches share: a minimal IMAP client session (no library in between, so the figures are the
servers', not a client's) and nearest-rank statistics."""

from __future__ import annotations

import math
import socket
import ssl
import statistics
from pathlib import Path


class LoginFailed(Exception):
    """A session that did not end in OK; `kind` groups failures for a report (e.g. `LOGIN NO [UNAVAILABLE]`)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def quote(s: str) -> str:
    """An IMAP quoted string (RFC 3501 quoted-specials escaped)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Conn:
    """Line reader and tagged command over one socket (plain or TLS after STARTTLS)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | ssl.SSLSocket = sock
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise LoginFailed("connection closed", self.buf[-120:].decode(errors="replace"))
            self.buf += chunk
        ln, _, self.buf = self.buf.partition(b"\r\n")
        return ln

    def command(self, tag: str, text: str) -> bytes:
        self.sock.sendall(f"{tag} {text}\r\n".encode())
        prefix = tag.encode() + b" "
        while True:
            ln = self.line()
            if ln.startswith(prefix):
                return ln


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    if not s:
        return float("nan")
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p95": pct(values, 95),
        "mean": statistics.fmean(values) if values else float("nan"),
        "min": min(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
    }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
