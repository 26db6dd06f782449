"""The streaming FETCH parser, table-driven, each case fed in chunks of 4096, 128, 16 and 1 bytes."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from sidecar.wire.fetchparse import (
    FetchParseError,
    FetchParser,
    FetchResponse,
    Tagged,
    Untagged,
    format_internaldate,
    parse_internaldate,
)

CHUNKS = [4096, 128, 16, 1]
BODY1 = b"From: a@example.org\r\nSubject: hi\r\n\r\nHello\r\n"
BODY_LF = b"Subject: lf\n\nline1\nline2\r\nline3\n"
TZ = dt.timezone(dt.timedelta(hours=-7))


def lit(b: bytes) -> bytes:
    return b"{%d}\r\n" % len(b) + b


# name -> (stream, expected events as comparable tuples)
CASES: dict[str, tuple[bytes, list[tuple[Any, ...]]]] = {
    "one message, usual order": (
        b'* 1 FETCH (UID 7 FLAGS (\\Seen $Label1) INTERNALDATE "17-Jul-1996 02:44:25 -0700" RFC822.SIZE 44 '
        b"BODY[] " + lit(BODY1) + b")\r\nA1 OK done\r\n",
        [
            ("F", 1, 7, ("\\Seen", "$Label1"), dt.datetime(1996, 7, 17, 2, 44, 25, tzinfo=TZ), 44, BODY1),
            ("T", "OK"),
        ],
    ),
    "body first, items after the literal": (
        b"* 2 FETCH (BODY[] " + lit(BODY1) + b' UID 9 FLAGS () INTERNALDATE " 1-Jan-2020 00:00:00 +0000")\r\n'
        b"A1 OK x\r\n",
        [
            ("F", 2, 9, (), dt.datetime(2020, 1, 1, tzinfo=dt.UTC), None, BODY1),
            ("T", "OK"),
        ],
    ),
    "interleaved untagged responses": (
        b"* 3 EXISTS\r\n* 1 FETCH (UID 1 BODY[] " + lit(b"") + b")\r\n* 1 EXPUNGE\r\n"
        b"* 2 FETCH (FLAGS (\\Deleted))\r\nA1 OK x\r\n",
        [
            ("U", b"* 3 EXISTS"),
            ("F", 1, 1, None, None, None, b""),
            ("U", b"* 1 EXPUNGE"),
            ("F", 2, None, ("\\Deleted",), None, None, None),
            ("T", "OK"),
        ],
    ),
    "literal containing CRLF and a FETCH-like line and braces": (
        b"* 1 FETCH (UID 3 BODY[] " + lit(b"x {5}\r\n* 2 FETCH (UID 4)\r\n)") + b")\r\nA1 OK x\r\n",
        [("F", 1, 3, None, None, None, b"x {5}\r\n* 2 FETCH (UID 4)\r\n)"), ("T", "OK")],
    ),
    "quoted body and NIL body": (
        b'* 1 FETCH (UID 1 BODY[] "a \\"q\\" b")\r\n* 2 FETCH (UID 2 BODY[] NIL)\r\nA1 NO some gone\r\n',
        [
            ("F", 1, 1, None, None, None, b'a "q" b'),
            ("F", 2, 2, None, None, None, None),
            ("T", "NO"),
        ],
    ),
    "header item and unknown items kept": (
        b"* 1 FETCH (UID 1 BODY[HEADER] " + lit(b"Subject: x\r\n\r\n") + b" MODSEQ (12))\r\nA1 OK\r\n",
        [("F", 1, 1, None, None, None, None), ("T", "OK")],
    ),
    "lower-case names": (
        b"* 1 fetch (uid 5 flags (\\Flagged) body[] {3}\r\nabc)\r\nA1 ok fine\r\n",
        [("F", 1, 5, ("\\Flagged",), None, None, b"abc"), ("T", "OK")],
    ),
}

BAD: dict[str, bytes] = {
    "unterminated quoted": b'* 1 FETCH (UID 1 INTERNALDATE "17-Jul)\r\n',
    "odd item count": b"* 1 FETCH (UID)\r\n",
    "uid not a number": b"* 1 FETCH (UID x1)\r\n",
    "flags not a list": b"* 1 FETCH (FLAGS \\Seen)\r\n",
    "bad date": b'* 1 FETCH (INTERNALDATE "31-Foo-2020 00:00:00 +0000")\r\n',
    "impossible date": b'* 1 FETCH (INTERNALDATE "31-Feb-2020 00:00:00 +0000")\r\n',
    "missing close paren": b"* 1 FETCH (UID 1\r\n",
    "junk after list": b"* 1 FETCH (UID 1) junk\r\n",
    "bad tagged line": b"A1 MAYBE\r\n",
    "continuation": b"+ go ahead\r\n",
    "data after completion": b"A1 OK\r\n* 1 FETCH (UID 1)\r\n",
    "unterminated section": b"* 1 FETCH (BODY[HEADER 1)\r\n",
    "huge small literal": b"* 1 FETCH (UID 1 X-THING {99999999}\r\n",
}


def feed_all(parser: FetchParser, stream: bytes, chunk: int) -> list[Any]:
    events: list[Any] = []
    for i in range(0, len(stream), chunk):
        events.extend(parser.feed(stream[i : i + chunk]))
    return events


def simplify(e: Any) -> tuple[Any, ...]:
    if isinstance(e, FetchResponse):
        return ("F", e.seq, e.uid, e.flags, e.internaldate, e.size, e.body.data() if e.body else None)
    if isinstance(e, Untagged):
        return ("U", e.line)
    assert isinstance(e, Tagged)
    return ("T", e.status)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("name", list(CASES))
def test_cases(name: str, chunk: int) -> None:
    stream, expected = CASES[name]
    parser = FetchParser()
    events = feed_all(parser, stream, chunk)
    assert [simplify(e) for e in events] == expected
    assert parser.done


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("name", list(BAD))
def test_malformed_raises(name: str, chunk: int) -> None:
    with pytest.raises(FetchParseError):
        feed_all(FetchParser(), BAD[name], chunk)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_large_body_spooled_to_file_with_sizes(tmp_path: Path, chunk: int) -> None:
    body = (BODY_LF * 200)[: 5000 - 1] + b"\r"  # ends in a CR: a bare-LF count must not be fooled
    stream = b"* 1 FETCH (UID 1 BODY[] " + lit(body) + b")\r\n* 2 FETCH (UID 2 BODY[] " + lit(BODY1)
    stream += b")\r\nA1 OK\r\n"
    parser = FetchParser(spool_dir=tmp_path, memory_limit=1000)
    events = feed_all(parser, stream, chunk)
    big, small = events[0].body, events[1].body
    assert big is not None and small is not None
    assert big.path is not None and big.path.parent == tmp_path and big.path.read_bytes() == body
    assert (big.path.stat().st_mode & 0o777) == 0o600
    assert small.in_memory and small.data() == BODY1
    assert big.size == len(body)
    assert big.vsize == len(body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    assert small.vsize == small.size == len(BODY1)


def test_line_length_bounded() -> None:
    parser = FetchParser()
    with pytest.raises(FetchParseError):
        for _ in range(300):
            parser.feed(b"x" * 4096)


def test_bad_fetch_discards_spool_file(tmp_path: Path) -> None:
    stream = b"* 1 FETCH (UID 1 BODY[] " + lit(b"y" * 3000) + b" UID)\r\n"
    with pytest.raises(FetchParseError):
        FetchParser(spool_dir=tmp_path, memory_limit=100).feed(stream)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "raw",
    [b"17-Jul-1996 02:44:25 -0700", b"01-Jan-2000 00:00:00 +0000", b"29-Feb-2024 23:59:59 +1345"],
)
def test_internaldate_round_trip(raw: bytes) -> None:
    assert format_internaldate(parse_internaldate(raw)).encode() == raw
