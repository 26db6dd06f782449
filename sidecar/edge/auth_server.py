"""The sidecar's auth socket: a UNIX stream server speaking sidecar.wire.authproto to autoport-checkpassword.

One request per connection: read one netstring (at most authproto.MAX_REQUEST bytes, within read_timeout
seconds), run policy.decide() in a thread pool, write one reply, close. What goes wrong, on the wire:

  malformed or oversized request   TEMP, then close (the shim exits 111; a well-behaved shim never sends one)
  silent or slow client            closed after read_timeout, no reply
  policy raises or overruns        TEMP (decide_timeout bounds how long a connection waits for an answer)
  more than max_connections open   TEMP at once, without reading

The server keeps serving whatever a single connection does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import stat
from typing import Protocol

from sidecar.wire import authproto
from sidecar.wire.authproto import TEMP, Reply, Request

log = logging.getLogger("sidecar.edge.auth_server")

READ_TIMEOUT = 5.0
DECIDE_TIMEOUT = 60.0
MAX_CONNECTIONS = 256

_background: set[asyncio.Task[None]] = set()


class Policy(Protocol):
    def decide(self, request: Request) -> Reply: ...


async def _read_request(reader: asyncio.StreamReader, timeout: float) -> Request:
    decoder = authproto.NetstringReader(authproto.MAX_REQUEST)
    async with asyncio.timeout(timeout):
        while True:
            chunk = await reader.read(4096)
            if not chunk:
                raise decoder.truncated()
            payload = decoder.feed(chunk)
            if payload is not None:
                return authproto.parse_request(payload)


async def start_auth_server(
    path: str,
    policy: Policy,
    *,
    mode: int = 0o660,
    workers: int | None = None,
    read_timeout: float = READ_TIMEOUT,
    decide_timeout: float = DECIDE_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> asyncio.AbstractServer:
    """Listen on the UNIX socket `path` (a stale socket file is replaced; any other file is an error).

    workers: threads running policy.decide (default: policy.cfg.limits.auth_concurrency * 2 + 4 when the
    policy has a config, else 16) - more than the policy's own limit on legacy checks, so that cheap answers
    (migrated, cached no) and the policy's "busy" TEMP are not queued behind slow legacy checks.
    """
    if workers is None:
        cfg = getattr(policy, "cfg", None)
        workers = cfg.limits.auth_concurrency * 2 + 4 if cfg is not None else 16
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="auth")
    open_connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_connections
        open_connections += 1
        try:
            if open_connections > max_connections:
                log.warning("auth socket: %d connections open, answering TEMP", open_connections)
                writer.write(authproto.encode_reply(Reply(TEMP)))
                return
            try:
                request = await _read_request(reader, read_timeout)
            except TimeoutError:
                log.warning("auth socket: no complete request within %.0fs, closing", read_timeout)
                return
            except authproto.ProtocolError as e:
                log.warning("auth socket: malformed request (%s), answering TEMP", e)
                writer.write(authproto.encode_reply(Reply(TEMP)))
                return
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(decide_timeout):
                    reply = await loop.run_in_executor(executor, policy.decide, request)
                data = authproto.encode_reply(reply)
            except TimeoutError:
                log.error("auth socket: no decision within %.0fs, answering TEMP", decide_timeout)
                data = authproto.encode_reply(Reply(TEMP))
            except Exception:
                log.exception("auth socket: policy failed, answering TEMP")
                data = authproto.encode_reply(Reply(TEMP))
            writer.write(data)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(read_timeout):
                    await writer.drain()
        except (ConnectionError, OSError) as e:
            log.info("auth socket: client went away (%s)", e)
        finally:
            open_connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            executor.shutdown(wait=False)
            raise FileExistsError(f"{path} exists and is not a socket")
        os.unlink(path)
    old_umask = os.umask(0o777 & ~mode)
    try:
        server = await asyncio.start_unix_server(handle, path=path, limit=authproto.MAX_REQUEST + 16)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)

    async def cleanup() -> None:
        await server.wait_closed()
        executor.shutdown(wait=False, cancel_futures=True)

    task = asyncio.get_running_loop().create_task(cleanup())
    _background.add(task)
    task.add_done_callback(_background.discard)
    log.info("auth socket listening on %s", path)
    return server
