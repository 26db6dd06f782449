"""SMTP AUTH relay: Postfix's Dovecot SASL client -> this socket -> Dovecot's auth-client socket.

More (the reasons and limits behind this module): docs/modules.md, sidecar/edge/saslrelay.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

log = logging.getLogger("autoport.sasl")

LINE_LIMIT = 1 << 20  # an auth line carries at most a base64 SASL round; Dovecot's own limit is far lower
CONNECT_TIMEOUT = 5.0


def is_temporary_fail(line: bytes) -> bool:
    """Whether an auth server line is a FAIL that Dovecot marked temporary."""
    fields = line.rstrip(b"\r\n").split(b"\t")
    if fields[0] != b"FAIL":
        return False
    return any(f == b"temp" or f == b"code=temp_fail" for f in fields[2:])


async def _pump_client(reader: asyncio.StreamReader, upstream: asyncio.StreamWriter) -> None:
    """Postfix -> Dovecot, bytes as they come (requests carry credentials: never looked at, never logged)."""
    while data := await reader.read(65536):
        upstream.write(data)
        await upstream.drain()
    with contextlib.suppress(OSError):
        upstream.write_eof()


async def _pump_server(upstream: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
    """Dovecot -> Postfix, line by line; a temporary FAIL ends the connection instead of being passed on."""
    while line := await upstream.readline():
        if is_temporary_fail(line):
            request_id = line.split(b"\t")[1].decode("ascii", "replace") if b"\t" in line else "?"
            log.info(
                "sasl: temporary authentication failure (request %s): closing the connection so Postfix answers 454",
                request_id[:16],
            )
            return
        client.write(line)
        await client.drain()


async def start_sasl_relay(path: str, upstream_path: str, *, mode: int = 0o660) -> asyncio.AbstractServer:
    """Listen on UNIX socket `path`; each connection is relayed to Dovecot's auth socket `upstream_path`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                up_reader, up_writer = await asyncio.open_unix_connection(upstream_path, limit=LINE_LIMIT)
        except (OSError, TimeoutError) as e:
            # Postfix sees the connection close during its handshake: a temporary failure (454 or 421)
            log.error("sasl: cannot reach Dovecot's auth socket %s: %s", upstream_path, e)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        tasks = [
            asyncio.ensure_future(_pump_client(reader, up_writer)),
            asyncio.ensure_future(_pump_server(up_reader, writer)),
        ]
        try:
            # either side ending (EOF, an error, or a temporary FAIL) ends the relay: Postfix holds one
            # connection per smtpd process and reconnects when it finds it closed
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is not None:
                    log.warning("sasl: relay connection ended: %s", type(error).__name__)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, OSError, ValueError):
                    await task
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()

    server = await asyncio.start_unix_server(handle, path=path, limit=LINE_LIMIT)
    os.chmod(path, mode)
    return server
