"""Fuzz targets: one function per codec, bytes in, an exception out only when the codec is wrong.

Each target feeds arbitrary bytes to one decoder (sometimes in chunks chosen by the first input byte) and
checks what the decoder promises: it raises only its own error type, it never holds more than its cap, and
what it accepts re-encodes to the same bytes. Any other exception, a broken invariant (AssertionError) or a
hang (the runner's alarm) is a finding.

The targets are used by ``python -m fuzz.run`` (mutation fuzzing or atheris) and by tests/unit/test_fuzz.py
(hypothesis, short runs in ``make test``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from sidecar import config
from sidecar.edge import checkpassword, socketmap
from sidecar.wire import authproto, fetchparse, netstring

Target = Callable[[bytes], None]


def _chunks(data: bytes) -> tuple[int, bytes]:
    """(chunk size, rest): the first byte picks how the rest is split (1..64 bytes, or all at once)."""
    if not data:
        return 0, b""
    size = data[0] % 65
    return size, data[1:]


def _split(data: bytes, size: int) -> list[bytes]:
    if size <= 0:
        return [data]
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


# --- authproto --------------------------------------------------------------------------------------------
def _reader_bound(reader: authproto.NetstringReader) -> None:
    held = len(reader._buf)
    # while the length prefix is read: at most its digits plus one; after it: the payload plus the comma
    assert held <= reader.max_payload + 1 + 1 or held <= authproto._LEN_DIGITS + 1, held


def authproto_request(data: bytes) -> None:
    size, rest = _chunks(data)
    reader = authproto.NetstringReader(authproto.MAX_REQUEST)
    payload = None
    try:
        for chunk in _split(rest, size):
            payload = reader.feed(chunk)
            _reader_bound(reader)
            if payload is not None:
                break
        try:
            whole = authproto.decode_request(rest)
        except authproto.ProtocolError:
            whole = None
        if payload is None:
            return
        req = authproto.parse_request(payload)
    except authproto.ProtocolError:
        return
    # accepted in chunks: the same as accepted whole, and canonical (re-encodes to the bytes we read)
    if whole is not None:
        assert whole == req
        assert authproto.encode_request(req) == rest
    assert "\0" not in req.user and "\r" not in req.user and "\n" not in req.user
    assert len(req.user.encode("utf-8", "surrogateescape")) <= authproto.MAX_USER


def authproto_reply(data: bytes) -> None:
    size, rest = _chunks(data)
    reader = authproto.NetstringReader(authproto.MAX_REPLY)
    payload = None
    try:
        for chunk in _split(rest, size):
            payload = reader.feed(chunk)
            _reader_bound(reader)
            if payload is not None:
                break
        if payload is None:
            return
        reply = authproto.parse_reply(payload)
    except authproto.ProtocolError:
        return
    assert reply.status in authproto.STATUSES
    for key, value in reply.fields.items():
        # a key becomes an environment variable name; only pass may carry CR/LF
        assert key and key.isascii() and key.upper().replace("_", "").isalnum(), key
        assert "\0" not in value
        assert key == "pass" or ("\r" not in value and "\n" not in value)
    assert authproto.decode_reply(authproto.encode_reply(reply)) == reply


def _payloads_ok(payloads: list[bytes], limit: int) -> None:
    assert all(len(p) <= limit for p in payloads)


# --- netstring (socketmap framing) ------------------------------------------------------------------------
def netstring_decoder(data: bytes) -> None:
    size, rest = _chunks(data)
    limit = 64 if size % 2 else socketmap.MAX_REQUEST
    dec = netstring.Decoder(limit)
    got: list[bytes] = []
    try:
        for chunk in _split(rest, size):
            out = dec.feed(chunk)
            _payloads_ok(out, limit)
            got.extend(out)
            # never more than one netstring's worth buffered: prefix digits, colon, payload, comma
            assert dec.pending <= len(str(limit)) + 1 + limit + 1, dec.pending
    except netstring.NetstringError as e:
        _payloads_ok(e.payloads, limit)
        got.extend(e.payloads)
        try:
            dec.feed(b"1:x,")
        except netstring.NetstringError:
            pass
        else:
            raise AssertionError("a poisoned decoder accepted more data") from None
        encoded = b"".join(netstring.encode(p) for p in got)
        assert rest.startswith(encoded)
        return
    encoded = b"".join(netstring.encode(p) for p in got)
    # what is left over is one incomplete netstring (its parsed length prefix is no longer buffered)
    assert rest.startswith(encoded) and len(rest) - len(encoded) >= dec.pending


def socketmap_request(data: bytes) -> None:
    try:
        name, key = socketmap.parse_request(data)
    except socketmap.SocketmapRequestError:
        return
    assert name and " " not in name
    assert f"{name} {key}".encode() == data


# --- fetchparse -------------------------------------------------------------------------------------------
_SPOOL = Path(tempfile.mkdtemp(prefix="ap-fuzz-spool-"))
_MEMORY_LIMIT = 256


def fetch_parser(data: bytes) -> None:
    size, rest = _chunks(data)
    parser = fetchparse.FetchParser(spool_dir=_SPOOL, memory_limit=_MEMORY_LIMIT)
    events: list[fetchparse.Event] = []
    try:
        for chunk in _split(rest, size):
            events.extend(parser.feed(chunk))
            # the unparsed line is bounded by MAX_LINE; bodies above the memory limit go to the spool
            assert len(parser._buf) <= fetchparse.MAX_LINE + 2
    except fetchparse.FetchParseError:
        parser.abort()
    finally:
        for ev in events:
            if isinstance(ev, fetchparse.FetchResponse) and ev.body is not None:
                ev.body.discard()
        parser.abort()
        leftovers = list(_SPOOL.iterdir())
        for leftover in leftovers:
            leftover.unlink()
    # a spool file nobody holds (an aborted or replaced body) would stay in the Maildir's tmp/ for ever
    assert not leftovers, f"spool file left behind: {leftovers[0].name}"


# --- the checkpassword fd 3 parser ------------------------------------------------------------------------
def checkpassword_fd3(data: bytes) -> None:
    data = data[: checkpassword.MAX_FD3 * 2]  # a pipe holds 64 KiB: stay well below
    r, w = os.pipe()
    try:
        os.write(w, data)
        os.close(w)
        w = -1
        try:
            user, password = checkpassword.read_fd3(r)
        except checkpassword._Exit as e:
            assert e.code in (checkpassword.EXIT_FAIL, checkpassword.EXIT_MISUSE), e.code
            return
        finally:
            r = -1  # read_fd3 closes it
        assert len(data) <= checkpassword.MAX_FD3
        assert b"\0" not in user and b"\0" not in password
        assert data.startswith(user + b"\0" + password + b"\0") and data.endswith(b"\0")
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


# --- the config loader ------------------------------------------------------------------------------------
_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="ap-fuzz-config-"))


def config_loader(data: bytes) -> None:
    path = _CONFIG_DIR / "autoport.toml"
    path.write_bytes(data)
    try:
        cfg = config.load(path)
    except config.ConfigError as e:
        assert str(path) in str(e), str(e)
        return
    # whatever loads renders to TOML that loads to the same configuration
    again = _CONFIG_DIR / "again.toml"
    again.write_text(config.render(cfg, redact=False))
    assert config.as_dict(config.load(again), redact=False) == config.as_dict(cfg, redact=False)


TARGETS: dict[str, Target] = {
    "authproto_request": authproto_request,
    "authproto_reply": authproto_reply,
    "netstring": netstring_decoder,
    "socketmap_request": socketmap_request,
    "fetchparse": fetch_parser,
    "checkpassword_fd3": checkpassword_fd3,
    "config": config_loader,
}
