"""The shim <-> sidecar codec: table-driven, each case fed whole and one byte at a time."""

from __future__ import annotations

import pytest

from sidecar.wire import authproto
from sidecar.wire.authproto import FAIL, OK, TEMP, NetstringReader, ProtocolError, Reply, Request


def ns(payload: bytes) -> bytes:
    return b"%d:%b," % (len(payload), payload)


# name, wire bytes, expected Request (or the ProtocolError message fragment)
REQUESTS: list[tuple[str, bytes, Request | str]] = [
    (
        "plain",
        ns(b"AUTH1\0alice\0s3cret\0imap\x00192.0.2.1\x00127.0.0.1"),
        Request("alice", "s3cret", "imap", "192.0.2.1", "127.0.0.1"),
    ),
    ("empty optional fields", ns(b"AUTH1\0bob\0pw\0\0\0"), Request("bob", "pw")),
    ("password with CR LF and spaces", ns(b"AUTH1\0bob\0a b\r\nc\0pop3\0\0"), Request("bob", "a b\r\nc", "pop3")),
    (
        "latin-1 password survives byte for byte",
        ns(b"AUTH1\0bob\0caf\xe9\0imap\0\0"),
        Request("bob", "caf\udce9", "imap"),
    ),
    ("utf-8 user", ns("AUTH1\0jörg\0pw\0imap\0\0".encode()), Request("jörg", "pw", "imap")),
    ("empty user", ns(b"AUTH1\0\0pw\0imap\0\0"), "empty user"),
    ("CR in user", ns(b"AUTH1\0a\rb\0pw\0imap\0\0"), "user contains CR or LF"),
    ("LF in service", ns(b"AUTH1\0a\0pw\0im\nap\0\0"), "service contains CR or LF"),
    ("too few fields", ns(b"AUTH1\0alice\0pw\0imap\0"), "5 fields"),
    ("too many fields (NUL inside a field)", ns(b"AUTH1\0ali\0ce\0pw\0imap\0\0"), "7 fields"),
    ("wrong magic", ns(b"AUTH2\0alice\0pw\0imap\0\0"), "not an AUTH1"),
    ("user too long", ns(b"AUTH1\0" + b"u" * 513 + b"\0pw\0imap\0\0"), "user longer"),
    ("password too long", ns(b"AUTH1\0u\0" + b"p" * 1025 + b"\0imap\0\0"), "password longer"),
    ("ip too long", ns(b"AUTH1\0u\0p\0imap\0" + b"1" * 65 + b"\0"), "remote ip longer"),
    ("message over the size bound", b"2049:" + b"x" * 2049 + b",", "longer than 2048"),
    ("length with leading zero", b"01:x,", "bad netstring length"),
    ("non-digit length", b"1a:x,", "bad netstring length"),
    ("huge length prefix", b"9999999:", "bad netstring length"),
    ("empty length", b":x,", "bad netstring length"),
    ("missing comma", b"3:abc;", "not terminated by a comma"),
    ("bytes after the message", ns(b"AUTH1\0a\0p\0imap\0\0") + b"x", "bytes after the message"),
]


def feed_all(data: bytes, max_payload: int, step: int) -> bytes | None:
    reader = NetstringReader(max_payload)
    result = None
    for i in range(0, len(data), step):
        result = reader.feed(data[i : i + step])
        if result is not None and i + step < len(data):
            # more bytes follow a complete message: feed them to see the error
            reader.feed(data[i + step :])
    if result is None:
        raise reader.truncated()
    return result


@pytest.mark.parametrize("step", [4096, 16, 1], ids=["whole", "16-bytes", "byte-by-byte"])
@pytest.mark.parametrize(("name", "wire", "expected"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_request_table(name: str, wire: bytes, expected: Request | str, step: int) -> None:
    if isinstance(expected, Request):
        payload = feed_all(wire, authproto.MAX_REQUEST, step)
        assert payload is not None
        assert authproto.parse_request(payload) == expected
        assert authproto.encode_request(expected) == wire  # round trip, byte for byte
    else:
        with pytest.raises(ProtocolError, match=expected):
            payload = feed_all(wire, authproto.MAX_REQUEST, step)
            assert payload is not None
            authproto.parse_request(payload)


REPLIES: list[tuple[str, bytes, Reply | str]] = [
    ("fail", ns(b"FAIL"), Reply(FAIL)),
    ("temp", ns(b"TEMP"), Reply(TEMP)),
    ("ok without fields", ns(b"OK"), Reply(OK)),
    (
        "ok with proxy fields",
        ns(b"OK\0proxy=y\0host=192.0.2.9\0port=143\0pass=a=b\r\nc"),
        Reply(OK, {"proxy": "y", "host": "192.0.2.9", "port": "143", "pass": "a=b\r\nc"}),
    ),
    ("empty value", ns(b"OK\0destuser="), Reply(OK, {"destuser": ""})),
    ("unknown status", ns(b"MAYBE"), "bad reply status"),
    ("fields on FAIL", ns(b"FAIL\0x=y"), "only an OK reply"),
    ("field without =", ns(b"OK\0proxy"), "without '='"),
    ("upper-case key", ns(b"OK\0PROXY=y"), "bad reply field name"),
    ("key with a space", ns(b"OK\0a b=y"), "bad reply field name"),
    ("empty key", ns(b"OK\0=y"), "bad reply field name"),
    ("LF in a non-pass value", ns(b"OK\0host=a\nb"), "contains CR or LF"),
    ("duplicate key", ns(b"OK\0a=1\0a=2"), "duplicate"),
    ("too many fields", ns(b"OK" + b"".join(b"\0k%d=v" % i for i in range(33))), "more than 32"),
    ("truncated", b"10:OK", "closed inside a message"),
    ("nothing", b"", "no message"),
]


@pytest.mark.parametrize("step", [4096, 16, 1], ids=["whole", "16-bytes", "byte-by-byte"])
@pytest.mark.parametrize(("name", "wire", "expected"), REPLIES, ids=[r[0] for r in REPLIES])
def test_reply_table(name: str, wire: bytes, expected: Reply | str, step: int) -> None:
    if isinstance(expected, Reply):
        payload = feed_all(wire, authproto.MAX_REPLY, step)
        assert payload is not None
        assert authproto.parse_reply(payload) == expected
        assert authproto.encode_reply(expected) == wire
    else:
        with pytest.raises(ProtocolError, match=expected):
            payload = feed_all(wire, authproto.MAX_REPLY, max(step, 1))
            assert payload is not None
            authproto.parse_reply(payload)


def test_encoder_refuses_what_the_decoder_refuses() -> None:
    with pytest.raises(ProtocolError):
        authproto.encode_request(Request("a\nb", "pw"))
    with pytest.raises(ProtocolError):
        authproto.encode_request(Request("a", "p\0w"))
    with pytest.raises(ProtocolError):
        authproto.encode_reply(Reply(FAIL, {"proxy": "y"}))
    with pytest.raises(ProtocolError):
        authproto.encode_reply(Reply(OK, {"Host": "x"}))


def test_reader_refuses_a_long_message_before_buffering_it() -> None:
    reader = NetstringReader(10)
    with pytest.raises(ProtocolError, match="longer than 10"):
        reader.feed(b"11:")


def test_repr_never_shows_the_password() -> None:
    req = Request("alice", "hunter2-secret", "imap")
    reply = Reply(OK, {"pass": "hunter2-secret", "host": "h"})
    assert "hunter2-secret" not in repr(req)
    assert "hunter2-secret" not in repr(reply)
    assert "alice" in repr(req)


def test_codec_imports_nothing() -> None:
    """The shim imports this module on every login: it must stay import-free (DESIGN.md: shim cost)."""
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(authproto.__file__).read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert imports == []
