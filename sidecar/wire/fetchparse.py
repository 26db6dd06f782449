"""Streaming parser for IMAP FETCH responses (codec layer: bytes in, typed records out, no socket I/O).

Hand-written on purpose: imapclient's response parser costs several times the CPU for the bulk
`UID FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])` (docs/design.md, "Measured numbers").
Literals are streamed: a message body is written to a Body as chunks arrive, kept in memory up to
`memory_limit` bytes and spooled to a file in `spool_dir` (the target folder's tmp/, so the Maildir writer can
rename it into place) beyond that. Memory stays bounded by the line limit plus the memory limit.

Feed bytes with `feed()`; it returns the complete responses seen so far: FetchResponse for `* n FETCH (...)`,
Untagged for other untagged lines, Tagged for the command's completion. Anything malformed raises
FetchParseError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import re
from pathlib import Path
from typing import BinaryIO

MAX_LINE = 1 << 20  # one response line (without literals); FLAGS with many keywords stays far below this
MAX_SMALL_LITERAL = 1 << 20  # literals that are not message bodies (quoted-as-literal names, header fields)
DEFAULT_MEMORY_LIMIT = 1 << 20  # bodies up to this size stay in memory
MAX_LITERAL_DIGITS = 12  # {N}: a terabyte; longer is garbage (and int() refuses above 4300 digits)
MAX_DEPTH = 32  # nested parentheses in one FETCH item list (BODYSTRUCTURE needs a handful)


def _count_bytes(buf: bytes | bytearray, sub: bytes, start: int, end: int) -> int:
    return buf.count(sub, start, end)


try:  # the W= size counts LF and CRLF in every body, exactly: StringZilla's SIMD count is 7x bytes.count for
    # b"\r\n" (8.9 against 1.2 GB/s measured; counting was 20% of a copy's CPU; bench/results/copier.md)
    import stringzilla as _stringzilla

    def _count_simd(buf: bytes | bytearray, sub: bytes, start: int, end: int) -> int:
        return int(_stringzilla.count(buf, sub, start, end))

    count_in = _count_simd
except ImportError:  # a platform without its wheel: the same counts, slower
    count_in = _count_bytes


class FetchParseError(ValueError):
    """The server sent something that is not a valid FETCH response stream."""


class Body:
    """A streamed message body: in memory up to a limit, else in a spool file (path) that the caller owns."""

    _counter = 0

    def __init__(self, expected: int, memory_limit: int, spool_dir: Path | None) -> None:
        self.expected = expected
        self.size = 0
        self.vsize = 0  # size with bare LF counted as CRLF (Maildir W=)
        self._prev_cr = False
        self.path: Path | None = None
        self._file: BinaryIO | None = None
        self._buf = bytearray()
        if expected > memory_limit and spool_dir is not None:
            Body._counter += 1
            name = f"autoport-spool.{os.getpid()}.{Body._counter}.{id(self):x}"
            self.path = spool_dir / name
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self._file = os.fdopen(fd, "wb", buffering=1 << 16)

    def write(self, chunk: bytes | bytearray, start: int = 0, end: int | None = None) -> None:
        """Append chunk[start:end]: counted and copied straight from the caller's buffer (no slice copy)."""
        if end is None:
            end = len(chunk)
        n = end - start
        if n <= 0:
            return
        lf = count_in(chunk, b"\n", start, end)
        crlf = count_in(chunk, b"\r\n", start, end) + (1 if self._prev_cr and chunk[start] == 0x0A else 0)
        self.vsize += n + (lf - crlf)
        self._prev_cr = chunk[end - 1] == 0x0D
        self.size += n
        with memoryview(chunk) as view:
            if self._file is not None:
                self._file.write(view[start:end])
            else:
                self._buf += view[start:end]

    def finish(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None

    @property
    def in_memory(self) -> bool:
        return self.path is None

    def data(self) -> bytes:
        """The whole body (reads the spool file when spooled: use only for small bodies and tests)."""
        if self.path is not None:
            return self.path.read_bytes()
        return bytes(self._buf)

    def view(self) -> memoryview:
        """The in-memory body without a copy (valid until the next write; not for a spooled body)."""
        if self.path is not None:
            raise ValueError("spooled body: use its path")
        return memoryview(self._buf)

    def head(self, limit: int = 1 << 16) -> bytes:
        if self.path is not None:
            with open(self.path, "rb") as f:
                return f.read(limit)
        return bytes(self._buf[:limit])

    def discard(self) -> None:
        """Remove the spool file (when the body is not used after all)."""
        self.finish()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.path = None
        self._buf = bytearray()


@dataclasses.dataclass
class FetchResponse:
    """One `* <seq> FETCH (...)` response, decoded."""

    seq: int
    uid: int | None = None
    flags: tuple[str, ...] | None = None
    internaldate: dt.datetime | None = None
    size: int | None = None  # RFC822.SIZE
    body: Body | None = None  # BODY[] / RFC822
    header: bytes | None = None  # BODY[HEADER] / RFC822.HEADER
    other: dict[str, object] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Untagged:
    line: bytes


@dataclasses.dataclass(frozen=True)
class Tagged:
    tag: bytes
    status: str  # OK, NO, BAD
    text: str


Event = FetchResponse | Untagged | Tagged

_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    )
}
_DATE_RE = re.compile(rb"^ ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$")


def parse_internaldate(raw: bytes) -> dt.datetime:
    """`17-Jul-1996 02:44:25 -0700` (day may be space-padded) -> aware datetime."""
    m = _DATE_RE.match(raw)
    if not m or m.group(2).decode().title() not in _MONTHS:
        raise FetchParseError(f"bad INTERNALDATE {raw[:40]!r}")
    day, mon, year, hh, mm, ss, sign, zh, zm = m.groups()
    offset = dt.timedelta(hours=int(zh), minutes=int(zm))
    try:
        tz = dt.timezone(-offset if sign == b"-" else offset)  # ValueError from +2400 on
        return dt.datetime(
            int(year), _MONTHS[mon.decode().title()], int(day), int(hh), int(mm), int(ss), tzinfo=tz
        )
    except ValueError as e:
        raise FetchParseError(f"bad INTERNALDATE {raw[:40]!r}") from e


def format_internaldate(when: dt.datetime) -> str:
    """The IMAP INTERNALDATE form of an aware datetime."""
    month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][
        when.month - 1
    ]
    off = when.utcoffset() or dt.timedelta(0)
    sign = "-" if off < dt.timedelta(0) else "+"
    minutes = abs(int(off.total_seconds())) // 60
    return (
        f"{when.day:02d}-{month}-{when.year:04d} {when:%H:%M:%S} {sign}{minutes // 60:02d}{minutes % 60:02d}"
    )


class _Lit:
    """Placeholder for a literal inside a response being assembled."""

    __slots__ = ("value",)

    def __init__(self, value: bytes | Body) -> None:
        self.value = value


Token = bytes | _Lit | list["Token"] | None

_LITERAL_AT_END = re.compile(rb"~?\{(\d+)\}$")
_BODY_ITEMS = (b"BODY[]", b"RFC822", b"BINARY[]")

# Fast path: the response to our own bulk FETCH (sidecar.legacy.imap.BODY_ITEMS) in the order Dovecot, Cyrus and
# most servers send it, `* n FETCH (UID u FLAGS (...) INTERNALDATE "..." RFC822.SIZE s BODY[] {s}` CRLF body `)`:
# the text before the literal matched by one regex instead of the tokenizer. Only plain atoms as flags (no
# quotes, brackets, parentheses, braces, % or control characters) and a quoted date without backslashes; anything
# else, another order, other spacing or case falls back to the tokenizer, which gives the same result
# (tests/unit/test_fetchparse.py checks both paths against each other).
_FAST_FETCH = re.compile(
    rb"\* ([0-9]{1,10}) FETCH \(UID ([0-9]{1,10}) FLAGS \(([A-Za-z0-9\\$!#&'*+,\-./:;<=>?@^_`|~ ]*)\) "
    rb'INTERNALDATE "([^"\\\x00-\x1f\x7f]*)" RFC822\.SIZE ([0-9]{1,10}) BODY\[\] '
)


class FetchParser:
    """Push parser for the response stream of one FETCH command (see module doc)."""

    def __init__(self, *, spool_dir: Path | None = None, memory_limit: int = DEFAULT_MEMORY_LIMIT) -> None:
        self.spool_dir = spool_dir
        self.memory_limit = memory_limit
        self._buf = bytearray()
        self._scan = 0  # where to continue looking for CRLF in _buf
        self._parts: list[bytes | _Lit] = []  # segments of the current response (text, literal, text...)
        self._line_len = 0  # text and small literals of the current response (bounded by MAX_LINE)
        self._body_mem = 0  # body literals of the current response held in memory (bounded by memory_limit)
        self._lit_left = 0
        self._lit_sink: Body | bytearray | None = None
        self._done = False

    @property
    def done(self) -> bool:
        """True once the tagged completion was parsed."""
        return self._done

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        try:
            return self._feed(data, events)
        except FetchParseError:
            for ev in events:  # parsed in this call, never handed out: their spool files are nobody's
                if isinstance(ev, FetchResponse) and ev.body is not None:
                    ev.body.discard()
            raise

    def _feed(self, data: bytes, events: list[Event]) -> list[Event]:
        if self._done and data:
            raise FetchParseError("data after the tagged completion")
        self._buf += data
        pos = 0
        buf = self._buf
        while pos < len(buf):
            if self._lit_left:
                take = min(self._lit_left, len(buf) - pos)
                sink = self._lit_sink
                if isinstance(sink, Body):
                    sink.write(buf, pos, pos + take)
                else:
                    assert sink is not None
                    with memoryview(buf) as view:
                        sink += view[pos : pos + take]
                pos += take
                self._lit_left -= take
                if self._lit_left == 0:
                    if isinstance(sink, Body):
                        sink.finish()
                        self._parts.append(_Lit(sink))
                    else:
                        assert sink is not None
                        self._parts.append(_Lit(bytes(sink)))
                    self._lit_sink = None
                    self._scan = pos
                continue
            end = buf.find(b"\r\n", max(self._scan, pos))
            if end < 0:
                self._scan = max(pos, len(buf) - 1)  # a CR at the end may pair with the next LF
                if self._line_len + len(buf) - pos > MAX_LINE:
                    raise FetchParseError(f"response line longer than {MAX_LINE} bytes")
                break
            segment = bytes(buf[pos:end])
            pos = end + 2
            self._scan = pos
            self._line_len += len(segment)
            if self._line_len > MAX_LINE:
                raise FetchParseError(f"response line longer than {MAX_LINE} bytes")
            m = _LITERAL_AT_END.search(segment)
            if m:
                if len(m.group(1)) > MAX_LITERAL_DIGITS:
                    raise FetchParseError(f"literal size has more than {MAX_LITERAL_DIGITS} digits")
                size = int(m.group(1))
                text = segment[: m.start()]
                self._parts.append(text)
                self._start_literal(text, size)
                if size == 0:
                    self._lit_left = 0
                    sink = self._lit_sink
                    if isinstance(sink, Body):
                        sink.finish()
                        self._parts.append(_Lit(sink))
                    else:
                        self._parts.append(_Lit(b""))
                    self._lit_sink = None
                continue
            self._parts.append(segment)
            parts, self._parts, self._line_len, self._body_mem = self._parts, [], 0, 0
            try:
                events.append(self._response(parts))
            except FetchParseError:
                self._drop_bodies(parts)  # a body of a refused response is nobody's: remove its spool file
                raise
            if self._done and pos < len(buf):
                raise FetchParseError("data after the tagged completion")
        del buf[:pos]
        self._scan = max(0, self._scan - pos)
        return events

    def _start_literal(self, text: bytes, size: int) -> None:
        item = text.rstrip().rsplit(b" ", 1)[-1].lstrip(b"(").upper()
        if any(item == b or (item.startswith(b) and item[len(b) : len(b) + 1] == b"<") for b in _BODY_ITEMS):
            body = Body(size, self.memory_limit, self.spool_dir)
            if body.in_memory and self.spool_dir is not None:
                # several in-memory bodies in one response must not add up past the memory limit
                self._body_mem += size
                if self._body_mem > self.memory_limit:
                    body.discard()
                    raise FetchParseError(f"bodies of one response exceed {self.memory_limit} bytes in memory")
            self._lit_sink = body
        else:
            if size > MAX_SMALL_LITERAL:
                raise FetchParseError(
                    f"literal of {size} bytes for {item[:40]!r} exceeds {MAX_SMALL_LITERAL}"
                )
            # small literals are held in memory with the response: they count toward its line limit
            self._line_len += size
            if self._line_len > MAX_LINE:
                raise FetchParseError(f"response longer than {MAX_LINE} bytes without its body")
            self._lit_sink = bytearray()
        self._lit_left = size

    def abort(self) -> None:
        """Discard a partly received body (connection lost mid-literal)."""
        if isinstance(self._lit_sink, Body):
            self._lit_sink.discard()
        for p in self._parts:
            if isinstance(p, _Lit) and isinstance(p.value, Body):
                p.value.discard()
        self._parts = []
        self._lit_sink = None

    # --- one complete response ---------------------------------------------------------------------------
    def _response(self, parts: list[bytes | _Lit]) -> Event:
        fast = self._fast_fetch(parts)
        if fast is not None:
            return fast
        first = parts[0]
        assert isinstance(first, bytes)
        if first.startswith(b"* "):
            m = re.match(rb"\* (\d+) FETCH \(", first, re.IGNORECASE)
            if not m:
                if len(parts) > 1:
                    self._drop_bodies(parts)
                return Untagged(first)
            try:
                return self._fetch(int(m.group(1)), parts, m.end() - 1)
            except FetchParseError:
                self._drop_bodies(parts)
                raise
        if first.startswith(b"+"):
            raise FetchParseError("unexpected continuation request")
        tag, _, rest = first.partition(b" ")
        status, _, text = rest.partition(b" ")
        if not tag or status.upper() not in (b"OK", b"NO", b"BAD") or len(parts) > 1:
            raise FetchParseError(f"malformed response line {first[:80]!r}")
        self._done = True
        return Tagged(tag, status.upper().decode(), text.decode("utf-8", "replace"))

    @staticmethod
    def _fast_fetch(parts: list[bytes | _Lit]) -> FetchResponse | None:
        """The common response decoded by one regex (see _FAST_FETCH), or None: use the tokenizer."""
        if len(parts) != 3 or parts[2] != b")":
            return None
        text, lit = parts[0], parts[1]
        if not isinstance(text, bytes) or not isinstance(lit, _Lit) or not isinstance(lit.value, Body):
            return None
        m = _FAST_FETCH.fullmatch(text)
        if m is None:
            return None
        seq, uid, flags, date, size = m.groups()
        names = flags.split(b" ") if flags else []
        if any(not f or f.upper() == b"NIL" for f in names):  # odd spacing or NIL: the tokenizer decides
            return None
        try:
            when = parse_internaldate(date)
        except FetchParseError:
            return None  # the tokenizer raises it again, dropping the body with it
        return FetchResponse(
            int(seq),
            uid=int(uid),
            flags=tuple(f.decode("ascii") for f in names),
            internaldate=when,
            size=int(size),
            body=lit.value,
        )

    @staticmethod
    def _drop_bodies(parts: list[bytes | _Lit]) -> None:
        for p in parts:
            if isinstance(p, _Lit) and isinstance(p.value, Body):
                p.value.discard()

    def _fetch(self, seq: int, parts: list[bytes | _Lit], start: int) -> FetchResponse:
        tokens = _Tokenizer(parts, start).parse_list_top()
        if len(tokens) % 2:
            raise FetchParseError(f"FETCH {seq}: odd number of items")
        resp = FetchResponse(seq)
        for i in range(0, len(tokens), 2):
            name, value = tokens[i], tokens[i + 1]
            if not isinstance(name, bytes):
                raise FetchParseError(f"FETCH {seq}: item name expected")
            key = name.upper()
            if key == b"UID":
                resp.uid = _number(value, "UID")
            elif key == b"FLAGS":
                if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
                    raise FetchParseError(f"FETCH {seq}: FLAGS must be a list of atoms")
                resp.flags = tuple(
                    v.decode("utf-8", "surrogateescape") for v in value if isinstance(v, bytes)
                )
            elif key == b"INTERNALDATE":
                raw = value.value if isinstance(value, _Lit) else value
                if not isinstance(raw, bytes):
                    raise FetchParseError(f"FETCH {seq}: INTERNALDATE must be a string")
                resp.internaldate = parse_internaldate(raw)
            elif key == b"RFC822.SIZE":
                resp.size = _number(value, "RFC822.SIZE")
            elif key in _BODY_ITEMS or (key.startswith(b"BODY[]<") and key.endswith(b">")):
                if resp.body is not None:  # a second body item replaces the first: drop its spool file
                    resp.body.discard()
                if isinstance(value, _Lit) and isinstance(value.value, Body):
                    resp.body = value.value
                elif value is None:
                    resp.body = None
                elif isinstance(value, bytes | _Lit):
                    raw = value.value if isinstance(value, _Lit) else value
                    assert isinstance(raw, bytes)
                    body = Body(len(raw), self.memory_limit, None)
                    body.write(raw)
                    resp.body = body
                else:
                    raise FetchParseError(f"FETCH {seq}: {key.decode()} must be a string")
            elif key in (b"BODY[HEADER]", b"RFC822.HEADER"):
                raw = value.value if isinstance(value, _Lit) else value
                if raw is not None and not isinstance(raw, bytes):
                    raise FetchParseError(f"FETCH {seq}: {key.decode()} must be a string")
                resp.header = raw
            else:
                resp.other[key.decode("ascii", "replace")] = value
        return resp


def _number(value: Token, what: str) -> int:
    if not isinstance(value, bytes) or not value.isdigit() or len(value) > 10:
        raise FetchParseError(f"{what} must be a number, not {str(value)[:40]}")
    return int(value)


class _Tokenizer:
    """Tokens of a FETCH item list: atoms (with [...] sections), quoted strings, NIL, lists, literals."""

    def __init__(self, parts: list[bytes | _Lit], start: int) -> None:
        self.parts = parts
        self.i = 0  # index in parts
        self.pos = start  # position in parts[i] (bytes)
        self.depth = 0

    def _text(self) -> bytes:
        p = self.parts[self.i]
        assert isinstance(p, bytes)
        return p

    def parse_list_top(self) -> list[Token]:
        t = self._text()
        if t[self.pos : self.pos + 1] != b"(":
            raise FetchParseError("FETCH item list must start with '('")
        self.pos += 1
        items = self._list()
        # nothing but spaces may follow the closing parenthesis
        while self.i < len(self.parts):
            rest = self.parts[self.i]
            if isinstance(rest, _Lit) or rest[self.pos :].strip(b" "):
                raise FetchParseError("data after the FETCH item list")
            self.i += 1
            self.pos = 0
        return items

    def _list(self) -> list[Token]:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FetchParseError(f"lists nested deeper than {MAX_DEPTH}")
        out: list[Token] = []
        while True:
            if self.i >= len(self.parts):
                raise FetchParseError("unterminated list")
            part = self.parts[self.i]
            if isinstance(part, _Lit):
                out.append(part)
                self.i += 1
                self.pos = 0
                continue
            t = part
            while self.pos < len(t) and t[self.pos] == 0x20:
                self.pos += 1
            if self.pos >= len(t):
                self.i += 1
                self.pos = 0
                continue
            c = t[self.pos]
            if c == 0x29:  # )
                self.pos += 1
                self.depth -= 1
                return out
            if c == 0x28:  # (
                self.pos += 1
                out.append(self._list())
            elif c == 0x22:  # "
                out.append(self._quoted(t))
            else:
                out.append(self._atom(t))

    def _quoted(self, t: bytes) -> bytes:
        out = bytearray()
        p = self.pos + 1
        while p < len(t):
            c = t[p]
            if c == 0x5C:  # backslash
                if p + 1 >= len(t):
                    break
                out.append(t[p + 1])
                p += 2
                continue
            if c == 0x22:
                self.pos = p + 1
                return bytes(out)
            out.append(c)
            p += 1
        raise FetchParseError("unterminated quoted string")

    def _atom(self, t: bytes) -> bytes | None:
        p = self.pos
        depth = 0
        while p < len(t):
            c = t[p]
            if c == 0x5B:  # [
                depth += 1
            elif c == 0x5D:  # ]
                depth -= 1
            elif depth == 0 and c in (0x20, 0x28, 0x29):
                break
            elif c in (0x22, 0x7B) and depth == 0:
                raise FetchParseError(f"unexpected {chr(c)!r} in atom")
            p += 1
        if depth != 0:
            raise FetchParseError("unterminated section '['")
        atom = t[self.pos : p]
        self.pos = p
        if not atom:
            raise FetchParseError("empty atom")
        if atom.upper() == b"NIL":
            return None
        return atom
