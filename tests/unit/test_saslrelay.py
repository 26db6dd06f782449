"""The SMTP AUTH relay between Postfix and Dovecot's auth socket (sidecar/edge/saslrelay.py).

The classification is pure logic (table below). The relaying is exercised against a scripted stand-in for
Dovecot's auth server on a UNIX socket; the real Postfix + Dovecot path (454 when the legacy server or the
store is down, 535 for a wrong password) is in test_passthrough_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from sidecar.edge.saslrelay import is_temporary_fail, start_sasl_relay

CASES = [
    (b"FAIL\t1\ttemp\n", True),
    (b"FAIL\t7\tuser=alice\tcode=temp_fail\ttemp\n", True),
    (b"FAIL\t7\tcode=temp_fail\n", True),
    (b"FAIL\t1\n", False),
    (b"FAIL\t1\tuser=alice\n", False),
    (b"FAIL\t1\treason=temp\n", False),  # a reason text is not the flag
    (b"FAIL\ttemp\n", False),  # that is the request id, not an argument
    (b"FAIL\t3\tuser=temp\n", False),
    (b"OK\t1\tuser=alice\ttemp\n", False),
    (b"CONT\t1\ttemp\n", False),
    (b"", False),
    (b"\n", False),
]


@pytest.mark.parametrize(("line", "temporary"), CASES)
def test_temporary_fail_classification(line: bytes, temporary: bool) -> None:
    assert is_temporary_fail(line) is temporary


HANDSHAKE = b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t42\nCUID\t1\nCOOKIE\tab\nDONE\n"

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _with_relay(tmp: Path, script: Script, client: Callable[[str], Awaitable[None]]) -> None:
    upstream = str(tmp / "dovecot-auth")
    relay_path = str(tmp / "sasl.sock")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    fake = await asyncio.start_unix_server(serve, path=upstream)
    relay = await start_sasl_relay(relay_path, upstream)
    try:
        await client(relay_path)
    finally:
        for s in (relay, fake):
            s.close()
            await s.wait_closed()


async def _dovecot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes) -> None:
    """A stand-in auth server: handshake, then one answer per AUTH request."""
    writer.write(HANDSHAKE)
    await writer.drain()
    while line := await reader.readline():
        if line.startswith(b"AUTH\t"):
            request_id = line.split(b"\t")[1]
            writer.write(answer.replace(b"<id>", request_id))
            await writer.drain()


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    """What arrives until the relay closes; a reset (it closed with our bytes unread) is a close too."""
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""


def test_handshake_and_ok_pass_through_byte_for_byte(tmp_path: Path) -> None:
    async def client(path: str) -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"VERSION\t1\t2\nCPID\t9\n")
        assert await asyncio.wait_for(reader.readexactly(len(HANDSHAKE)), 5) == HANDSHAKE
        writer.write(b"AUTH\t5\tPLAIN\tservice=smtp\tresp=AGFsaWNlAHNlY3JldA==\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.readline(), 5) == b"OK\t5\tuser=alice\n"
        writer.write(b"AUTH\t6\tPLAIN\tservice=smtp\tresp=AGFsaWNlAHNlY3JldA==\n")  # the connection goes on
        assert await asyncio.wait_for(reader.readline(), 5) == b"OK\t6\tuser=alice\n"
        writer.close()
        await writer.wait_closed()

    asyncio.run(_with_relay(tmp_path, lambda r, w: _dovecot(r, w, b"OK\t<id>\tuser=alice\n"), client))


def test_ordinary_fail_passes_through_and_the_connection_stays(tmp_path: Path) -> None:
    async def client(path: str) -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        await asyncio.wait_for(reader.readexactly(len(HANDSHAKE)), 5)
        for n in (1, 2):
            writer.write(b"AUTH\t%d\tPLAIN\tservice=smtp\tresp=AGEAYg==\n" % n)
            assert await asyncio.wait_for(reader.readline(), 5) == b"FAIL\t%d\tuser=a\n" % n
        writer.close()
        await writer.wait_closed()

    asyncio.run(_with_relay(tmp_path, lambda r, w: _dovecot(r, w, b"FAIL\t<id>\tuser=a\n"), client))


def test_temporary_fail_closes_the_connection_and_is_not_passed_on(tmp_path: Path) -> None:
    async def client(path: str) -> None:
        for _ in range(2):  # Postfix reconnects after the close; the relay serves the new connection
            reader, writer = await asyncio.open_unix_connection(path)
            await asyncio.wait_for(reader.readexactly(len(HANDSHAKE)), 5)
            writer.write(b"AUTH\t3\tPLAIN\tservice=smtp\tresp=AGEAYg==\n")
            assert await _read_all(reader) == b""  # EOF, and the FAIL line never reached the client
            writer.close()
            await writer.wait_closed()

    asyncio.run(_with_relay(tmp_path, lambda r, w: _dovecot(r, w, b"FAIL\t<id>\tcode=temp_fail\ttemp\n"), client))


def test_dovecot_unreachable_closes_the_client_connection(tmp_path: Path) -> None:
    async def run() -> None:
        relay_path = str(tmp_path / "sasl.sock")
        relay = await start_sasl_relay(relay_path, str(tmp_path / "nothing-here"))
        try:
            for _ in range(2):
                reader, writer = await asyncio.open_unix_connection(relay_path)
                writer.write(b"VERSION\t1\t2\nCPID\t9\n")
                assert await _read_all(reader) == b""
                writer.close()
                with contextlib.suppress(ConnectionResetError):
                    await writer.wait_closed()
        finally:
            relay.close()
            await relay.wait_closed()

    asyncio.run(run())


def test_an_oversized_line_from_dovecot_ends_that_connection_only(tmp_path: Path) -> None:
    calls = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            writer.write(b"X" * (2 << 20))  # no newline within the relay's line bound
            await writer.drain()
            await reader.read()
        else:
            await _dovecot(reader, writer, b"OK\t<id>\n")

    async def client(path: str) -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        data = await _read_all(reader)
        assert b"X" * 100 not in data
        writer.close()
        await writer.wait_closed()
        reader, writer = await asyncio.open_unix_connection(path)
        assert await asyncio.wait_for(reader.readexactly(len(HANDSHAKE)), 5) == HANDSHAKE
        writer.close()
        await writer.wait_closed()

    asyncio.run(_with_relay(tmp_path, script, client))
