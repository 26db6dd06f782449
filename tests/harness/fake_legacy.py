"""A recording fake legacy server (IMAP, POP3, SMTP): logs every command it receives, answers from a script."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import re
import socket
import socketserver
import threading
from collections.abc import Callable
from typing import Any

from sidecar.config import LegacyConfig

# --- a recording fake legacy server ---------------------------------------------------------------------------


@dataclasses.dataclass
class Command:
    """One command as the fake server parsed it: the raw line(s), the tag and verb, decoded arguments."""

    raw: bytes
    verb: str
    args: list[bytes]


class FakeLegacy:
    """IMAP, POP3 and SMTP on loopback that record every line they receive and refuse (or accept) logins.

    accept: the password that logs in (anything else is refused). delay: seconds before the greeting (a slow
    legacy server). starttls: whether STARTTLS/STLS is advertised (it is never actually done).
    """

    def __init__(self, *, accept: str = "", delay: float = 0.0, starttls: bool = False) -> None:
        self.accept = accept
        self.delay = delay
        self.starttls = starttls
        self.commands: dict[str, list[Command]] = {"imap": [], "pop3": [], "smtp": []}
        self.connections = {"imap": 0, "pop3": 0, "smtp": 0}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.servers: dict[str, socketserver.ThreadingTCPServer] = {}
        for proto, handler in (("imap", self._imap), ("pop3", self._pop3), ("smtp", self._smtp)):
            self.servers[proto] = self._serve(proto, handler)

    def _serve(self, proto: str, fn: Callable[[socket.socket, Any], None]) -> socketserver.ThreadingTCPServer:
        fake = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with fake.lock:
                    fake.connections[proto] += 1
                sock = self.request
                sock.settimeout(30)
                if fake.delay and fake.stopping.wait(fake.delay):
                    return
                with contextlib.suppress(OSError, ValueError):  # the client went away
                    fn(sock, sock.makefile("rb"))

        srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return srv

    def port(self, proto: str) -> int:
        return int(self.servers[proto].server_address[1])

    def close(self) -> None:
        self.stopping.set()
        for srv in self.servers.values():
            srv.shutdown()
            srv.server_close()

    def config(self, **kw: Any) -> LegacyConfig:
        base: dict[str, Any] = {
            "host": "127.0.0.1", "imap_port": self.port("imap"), "imap_tls": "none", "pop3_port": self.port("pop3"),
            "pop3_tls": "none", "submission_port": self.port("smtp"), "submission_tls": "none", "timeout": 5.0,
        }  # fmt: skip
        base.update(kw)
        return LegacyConfig(**base)

    def _record(self, proto: str, cmd: Command) -> None:
        with self.lock:
            self.commands[proto].append(cmd)

    # IMAP: commands with quoted strings and literals ({N} and {N+})
    def _imap(self, sock: socket.socket, f: Any) -> None:
        caps = b"IMAP4rev1 AUTH=PLAIN ID" + (b" STARTTLS" if self.starttls else b"")
        sock.sendall(b"* OK [CAPABILITY " + caps + b"] fake ready\r\n")
        while True:
            raw = f.readline(65536)
            if not raw:
                return
            while (m := re.search(rb"\{(\d+)(\+?)\}\r\n$", raw)) is not None:  # a literal follows
                if not m.group(2):
                    sock.sendall(b"+ go ahead\r\n")
                raw += f.read(int(m.group(1)))
                raw += f.readline(65536)
            tag, verb, args = _imap_parse(raw)
            self._record("imap", Command(raw, verb, args))
            if verb == "CAPABILITY":
                sock.sendall(b"* CAPABILITY " + caps + b"\r\n" + tag + b" OK done\r\n")
            elif verb == "ID":
                sock.sendall(b"* ID NIL\r\n" + tag + b" OK done\r\n")
            elif verb == "LOGIN":
                ok = len(args) == 2 and self.accept and args[1] == self.accept.encode()
                sock.sendall(tag + (b" OK logged in\r\n" if ok else b" NO [AUTHENTICATIONFAILED] no\r\n"))
            elif verb == "AUTHENTICATE":
                sock.sendall(b"+ \r\n")
                line = f.readline(65536)
                self._record("imap", Command(line, "<sasl>", [base64.b64decode(line.strip() or b"=")]))
                sock.sendall(tag + b" NO [AUTHENTICATIONFAILED] no\r\n")
            elif verb == "LOGOUT":
                sock.sendall(b"* BYE\r\n" + tag + b" OK bye\r\n")
                return
            else:
                sock.sendall(tag + b" BAD unknown command\r\n")

    def _pop3(self, sock: socket.socket, f: Any) -> None:
        sock.sendall(b"+OK fake ready\r\n")
        while True:
            raw = f.readline(65536)
            if not raw:
                return
            verb, _, arg = raw.rstrip(b"\r\n").partition(b" ")
            self._record("pop3", Command(raw, verb.decode("ascii", "replace").upper(), [arg]))
            v = verb.upper()
            if v == b"CAPA":
                stls = b"STLS\r\n" if self.starttls else b""
                sock.sendall(b"+OK\r\nUSER\r\nSASL PLAIN\r\n" + stls + b".\r\n")
            elif v == b"USER":
                sock.sendall(b"+OK\r\n")
            elif v in (b"PASS", b"AUTH"):
                sock.sendall(b"-ERR [AUTH] no\r\n")
            elif v == b"QUIT":
                sock.sendall(b"+OK bye\r\n")
                return
            else:
                sock.sendall(b"-ERR unknown command\r\n")

    def _smtp(self, sock: socket.socket, f: Any) -> None:
        sock.sendall(b"220 fake ESMTP\r\n")
        while True:
            raw = f.readline(65536)
            if not raw:
                return
            verb, _, arg = raw.rstrip(b"\r\n").partition(b" ")
            self._record("smtp", Command(raw, verb.decode("ascii", "replace").upper(), [arg]))
            v = verb.upper()
            if v == b"EHLO":
                tls = b"250-STARTTLS\r\n" if self.starttls else b""
                sock.sendall(b"250-fake\r\n" + tls + b"250-AUTH PLAIN\r\n250 8BITMIME\r\n")
            elif v == b"AUTH":
                sock.sendall(b"535 5.7.8 no\r\n")
            elif v == b"QUIT":
                sock.sendall(b"221 bye\r\n")
                return
            else:
                sock.sendall(b"502 5.5.2 unknown command\r\n")


def _imap_parse(raw: bytes) -> tuple[bytes, str, list[bytes]]:
    """tag, verb and arguments (atoms, quoted strings unescaped, literals) of one IMAP command."""
    line = raw[:-2] if raw.endswith(b"\r\n") else raw
    tag, _, rest = line.partition(b" ")
    verb, _, rest = rest.partition(b" ")
    args: list[bytes] = []
    i = 0
    while i < len(rest):
        c = rest[i : i + 1]
        if c == b" ":
            i += 1
        elif c == b'"':
            out = bytearray()
            i += 1
            while i < len(rest) and rest[i : i + 1] != b'"':
                if rest[i : i + 1] == b"\\":
                    i += 1
                out += rest[i : i + 1]
                i += 1
            args.append(bytes(out))
            i += 1
        elif (m := re.match(rb"\{(\d+)\+?\}\r\n", rest[i:])) is not None:
            start = i + m.end()
            args.append(rest[start : start + int(m.group(1))])
            i = start + int(m.group(1))
        else:
            end = rest.find(b" ", i)
            end = len(rest) if end < 0 else end
            args.append(rest[i:end])
            i = end
    return tag, verb.decode("ascii", "replace").upper(), args
