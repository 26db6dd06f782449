"""The netstring codec against a table of byte streams (tests/data/netstring_cases.tsv), fed whole and in
chunks of 4096, 128, 16 and 1 bytes, plus round trips and the buffering bound."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.wire import netstring
from sidecar.wire.netstring import Decoder, NetstringError, NetstringTooLong

CASES = Path(__file__).parent / "data" / "netstring_cases.tsv"
CHUNK_SIZES = [None, 4096, 128, 16, 1]  # None: the whole input in one feed()
ERRORS = {"NetstringError": NetstringError, "NetstringTooLong": NetstringTooLong}


def _bytes(field: str) -> bytes:
    if field == "<empty>":
        return b""
    decoded, _ = codecs.escape_decode(field.encode("utf-8"))
    return bytes(decoded)


def load_cases() -> list[tuple[str, int, bytes, list[bytes], str]]:
    cases = []
    for line in CASES.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        name, max_size, raw, expected = line.split("\t")
        payloads_part, _, error = expected.partition("!")
        payloads_part = payloads_part.strip()
        payloads = [] if payloads_part in ("", "-") else [_bytes(p) for p in payloads_part.split(" | ")]
        cases.append((name, int(max_size), _bytes(raw), payloads, error.strip()))
    return cases


def feed_all(decoder: Decoder, data: bytes, chunk: int | None) -> tuple[list[bytes], Exception | None]:
    got: list[bytes] = []
    chunks = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for piece in chunks:
        try:
            got += decoder.feed(piece)
        except NetstringError as e:
            return got + e.payloads, e
    return got, None


@pytest.mark.parametrize("chunk", CHUNK_SIZES, ids=lambda c: f"chunk{c or 'whole'}")
@pytest.mark.parametrize(
    ("name", "max_size", "data", "payloads", "error"), load_cases(), ids=[c[0] for c in load_cases()]
)
def test_table(name: str, max_size: int, data: bytes, payloads: list[bytes], error: str, chunk: int | None) -> None:
    got, exc = feed_all(Decoder(max_size), data, chunk)
    if not error:
        assert exc is None, f"{name}: unexpected {exc!r}"
        assert got == payloads
        return
    assert exc is not None, f"{name}: accepted {got!r}, expected {error}"
    assert type(exc) is ERRORS[error], f"{name}: {exc!r}"
    # everything that came before the error in the stream is delivered (returned, or on the exception)
    assert got == payloads


def test_table_is_loaded() -> None:
    cases = load_cases()
    assert len(cases) >= 20
    assert {c[4] for c in cases} == {"", "NetstringError", "NetstringTooLong"}


def test_error_poisons_decoder() -> None:
    d = Decoder(100)
    with pytest.raises(NetstringError):
        d.feed(b"x:")
    with pytest.raises(NetstringError) as e:
        d.feed(b"1:a,")  # framing is lost for good: the caller must close
    assert e.value.payloads == []


def test_oversize_refused_before_payload_is_buffered() -> None:
    d = Decoder(1000)
    with pytest.raises(NetstringTooLong):
        d.feed(b"1001:")  # refused at the colon, not after 1001 bytes arrive
    d = Decoder(1000)
    with pytest.raises(NetstringTooLong):
        d.feed(b"10000")  # five digits cannot be a length <= 1000


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=20),
    chunk=st.integers(min_value=1, max_value=700),
)
def test_round_trip_any_chunking(payloads: list[bytes], chunk: int) -> None:
    stream = b"".join(netstring.encode(p) for p in payloads)
    d = Decoder(300)
    got, exc = feed_all(d, stream, chunk)
    assert exc is None
    assert got == payloads
    assert d.pending == 0


@given(data=st.binary(max_size=2000), chunk=st.integers(min_value=1, max_value=64))
def test_buffer_stays_bounded_on_garbage(data: bytes, chunk: int) -> None:
    d = Decoder(100)
    for i in range(0, len(data), chunk):
        try:
            d.feed(data[i : i + chunk])
        except NetstringError:
            break
        # never more than one maximal netstring in progress (prefix, colon, payload; the comma ends it)
        assert d.pending <= 3 + 1 + 100


def test_encode() -> None:
    assert netstring.encode(b"") == b"0:,"
    assert netstring.encode(b"OK lmtp:unix:private/dovecot-lmtp") == b"33:OK lmtp:unix:private/dovecot-lmtp,"
