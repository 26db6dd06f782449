"""The checkpassword shim as Dovecot runs it (fd 3, environment) against a real auth server with a fake policy."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

from sidecar.edge.auth_server import start_auth_server
from sidecar.wire.authproto import FAIL, OK, TEMP, Reply, Request

SHIM = str(Path(__file__).resolve().parents[2] / "sidecar" / "edge" / "checkpassword.py")


class FakePolicy:
    """alice/right-pw -> OK with fields; slow -> sleeps; crash -> raises; temp -> TEMP; others -> FAIL."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def decide(self, request: Request) -> Reply:
        self.requests.append(request)
        if request.user == "alice" and request.password == "right pw\u00e9":
            return Reply(
                OK,
                {
                    "proxy": "y",
                    "host": "192.0.2.10",
                    "port": "143",
                    "pass": request.password,
                    "userdb_uid": "5000",
                    "userdb_gid": "5000",
                },
            )
        if request.user == "temp":
            return Reply(TEMP)
        if request.user == "slow":
            import time

            time.sleep(3)
            return Reply(OK)
        if request.user == "crash":
            raise RuntimeError("policy bug")
        return Reply(FAIL)


class Server:
    def __init__(self, path: str, policy: FakePolicy) -> None:
        self.path = path
        self.policy = policy
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            start_auth_server(path, policy, read_timeout=1.0, decide_timeout=1.5), self.loop
        ).result(5)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:  # connections still waiting for a (slow) decision
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


FD3_WRAPPER = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.execve(sys.argv[2], sys.argv[2:], os.environ)"


def spawn_with_fd3(
    argv: list[str], fd3: bytes | None, *, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run argv with fd3 readable on descriptor 3 (as Dovecot does), without touching our own fd 3."""
    if fd3 is None:
        return subprocess.run(argv, env=env, capture_output=True, timeout=20, check=False)
    r, w = os.pipe()
    try:
        os.write(w, fd3)
        os.close(w)
        wrapped = [sys.executable, "-I", "-S", "-c", FD3_WRAPPER, str(r), *argv]
        return subprocess.run(wrapped, env=env, pass_fds=(r,), capture_output=True, timeout=20, check=False)
    finally:
        os.close(r)


def run_shim(
    sock: str,
    fd3: bytes | None,
    tmp_path: Path,
    *,
    service: str = "imap",
    extra_args: tuple[str, ...] = (),
) -> tuple[int, dict[str, str], str]:
    """Run the shim like Dovecot does; the reply program dumps its environment to a file."""
    out = tmp_path / "reply-env"
    reply = tmp_path / "reply.sh"
    reply.write_text(f"#!/bin/sh\n/usr/bin/env -0 > {out}\nexit 0\n")
    reply.chmod(0o755)
    env = {
        "PATH": "/usr/bin:/bin",
        "SERVICE": service,
        "TCPREMOTEIP": "198.51.100.7",
        "TCPLOCALIP": "127.0.0.1",
    }
    argv = [sys.executable, "-I", "-S", SHIM, "--socket", sock, *extra_args, str(reply)]
    p = spawn_with_fd3(argv, fd3, env=env)
    got: dict[str, str] = {}
    if out.exists():
        for item in out.read_bytes().split(b"\0"):
            if item:
                k, _, v = item.partition(b"=")
                got[k.decode()] = v.decode("utf-8", "surrogateescape")
    return p.returncode, got, p.stderr.decode()
