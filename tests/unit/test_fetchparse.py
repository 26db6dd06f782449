"""The streaming FETCH parser, table-driven, each case fed in chunks of 4096, 128, 16 and 1 bytes."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.wire import fetchparse
from sidecar.wire.fetchparse import (
    Body,
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


# --- the fast path (one regex for our own item order) against the tokenizer -----------------------------------
def usual(flags: bytes, body: bytes = BODY1, date: bytes = b"17-Jul-1996 02:44:25 -0700", uid: bytes = b"7") -> bytes:
    """The response to our bulk FETCH in Dovecot's item order, with these raw FLAGS list contents."""
    return (
        b"* 1 FETCH (UID " + uid + b" FLAGS (" + flags + b') INTERNALDATE "' + date + b'" RFC822.SIZE '
        + b"%d BODY[] " % len(body) + lit(body) + b")\r\n"
    )  # fmt: skip


FAST_SAME: dict[str, bytes] = {
    "usual": usual(b"\\Seen $Label1"),
    "no flags": usual(b""),
    "odd but valid atom flags": usual(b"\\Answered $Junk! a.b-c_d+e/f:g;h<i>j=k?l@m^n`o|p~q'r,s&t#u*v \\*"),
    "body with FETCH-like lines, braces and a closing parenthesis": usual(
        b"\\Seen", b"x {5}\r\n* 2 FETCH (UID 4 FLAGS (\\Seen) BODY[] {1}\r\n)\r\n)"
    ),
    "empty body": usual(b"", b""),
    "bare LF body": usual(b"", BODY_LF),
    "space-padded day": usual(b"", date=b" 1-Jan-2020 00:00:00 +0000"),
    # not for the regex: the tokenizer decides (same result or the same error)
    "double space in flags": usual(b"\\Seen  \\Flagged"),
    "leading space in flags": usual(b" \\Seen"),
    "bracket in a flag": usual(b"$a[1]"),
    "8-bit flag": usual("$Erledigt-ä".encode()),
    "lower-case item names": usual(b"\\Seen").replace(b"UID", b"uid"),
    "another item order": b"* 1 FETCH (FLAGS (\\Seen) UID 7 BODY[] " + lit(BODY1) + b")\r\n",
    "uid with leading zeros": usual(b"", uid=b"0007"),
}
FAST_BAD: dict[str, bytes] = {
    "NIL as a flag": usual(b"\\Seen NIL"),
    "nil as a flag": usual(b"nil"),
    "impossible date": usual(b"", date=b"31-Feb-2020 00:00:00 +0000"),
    "bad month": usual(b"", date=b"17-Foo-1996 02:44:25 -0700"),
    "uid of 11 digits": usual(b"", uid=b"12345678901"),
    "junk after the list": usual(b"").replace(b")\r\n", b") junk\r\n"),
}


def parse_both(stream: bytes, chunk: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """(fast-path result, tokenizer-only result): events, or the error text."""
    out: list[Any] = []
    for fast in (True, False):
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(FetchParser, "_fast_fetch", staticmethod(lambda parts: None))
            spool = tmp_path / ("fast" if fast else "slow")
            spool.mkdir()
            try:
                events = feed_all(FetchParser(spool_dir=spool, memory_limit=40), stream + b"A1 OK\r\n", chunk)
                out.append([simplify(e) for e in events])
            except FetchParseError as e:
                out.append(("error", str(e), sorted(p.name for p in spool.iterdir())))
    return out[0], out[1]


@pytest.mark.parametrize("chunk", [4096, 7, 1])
@pytest.mark.parametrize("name", list(FAST_SAME))
def test_fast_path_same_result_as_tokenizer(
    name: str, chunk: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, slow = parse_both(FAST_SAME[name], chunk, tmp_path, monkeypatch)
    assert fast == slow
    assert fast[0][0] == "F" and fast[-1] == ("T", "OK")


@pytest.mark.parametrize("name", list(FAST_BAD))
def test_fast_path_malformed_same_error(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow = parse_both(FAST_BAD[name], 4096, tmp_path, monkeypatch)
    assert fast == slow
    assert fast[0] == "error" and fast[2] == []  # the spooled body of the refused response is gone


def test_fast_path_taken_for_our_item_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual response never reaches the tokenizer; the others do (a fast path that is never taken, or taken
    for input it does not understand, would pass the comparisons above)."""
    import sidecar.wire.fetchparse as fp

    calls = []
    real = fp._Tokenizer.parse_list_top

    def counting(self: Any) -> Any:
        calls.append(1)
        return real(self)

    monkeypatch.setattr(fp._Tokenizer, "parse_list_top", counting)
    feed_all(FetchParser(), usual(b"\\Seen $Label1") + usual(b"") + b"A1 OK\r\n", 4096)
    assert calls == []
    for name in ("double space in flags", "bracket in a flag", "8-bit flag", "another item order"):
        feed_all(FetchParser(), FAST_SAME[name] + b"A1 OK\r\n", 4096)
    assert len(calls) == 4


@pytest.mark.parametrize("counter", ["simd", "bytes"])
@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=300) | st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"x", b"\n\r"])).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=8),
)
def test_w_size_is_exact_for_any_line_endings_and_chunking(counter: str, body: bytes, cuts: list[int]) -> None:
    """vsize (Maildir W=) = the size with every bare LF counted as CRLF, however the body arrives in chunks
    (a CR at the end of one chunk and its LF at the start of the next), with the SIMD counter and without."""
    count = fetchparse.count_in if counter == "simd" else fetchparse._count_bytes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fetchparse, "count_in", count)
        b = Body(len(body), 1 << 20, None)
        edges = sorted({0, len(body), *(c for c in cuts if c <= len(body))})
        buf = bytearray(b"j\r\n\n") + bytearray(body) + bytearray(b"\n\r\nt")  # counted within start:end only
        for lo, hi in itertools.pairwise(edges):
            b.write(buf, 4 + lo, 4 + hi)
    assert b.size == len(body)
    assert b.vsize == len(body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    assert b.data() == body


def test_the_simd_counter_is_in_use() -> None:
    """stringzilla is a dependency (pyproject.toml): the copier's counts must not fall back silently."""
    assert fetchparse.count_in is not fetchparse._count_bytes
