"""The real shim as Dovecot runs it (subprocess, fd 3, environment) against a real AuthServer socket."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar import authproto
from sidecar.auth_server import start_auth_server
from sidecar.authproto import FAIL, OK, TEMP, Reply, Request

SHIM = str(Path(__file__).resolve().parents[1] / "sidecar" / "checkpassword.py")


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


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(str(tmp_path / "auth.sock"), FakePolicy())
    yield s
    s.close()


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


def test_ok_execs_the_reply_program_with_extra_fields(server: Server, tmp_path: Path) -> None:
    code, env, err = run_shim(server.path, "alice\0right pw\u00e9\0\0".encode(), tmp_path)
    assert (code, err) == (0, "")
    assert env["EXTRA"].split() == ["PROXY", "HOST", "PORT", "PASS", "USERDB_UID", "USERDB_GID"]
    assert (env["PROXY"], env["HOST"], env["PORT"], env["PASS"]) == (
        "y",
        "192.0.2.10",
        "143",
        "right pw\u00e9",
    )
    assert env["SERVICE"] == "imap"  # Dovecot's environment is passed on
    req = server.policy.requests[0]
    assert (req.user, req.service, req.remote_ip, req.local_ip) == (
        "alice",
        "imap",
        "198.51.100.7",
        "127.0.0.1",
    )


def test_wrong_password_exits_1(server: Server, tmp_path: Path) -> None:
    code, env, _ = run_shim(server.path, b"alice\0wrong\0\0", tmp_path)
    assert code == 1 and env == {}


def test_temp_exits_111(server: Server, tmp_path: Path) -> None:
    assert run_shim(server.path, b"temp\0pw\0\0", tmp_path)[0] == 111


def test_policy_crash_is_temporary_and_server_keeps_serving(server: Server, tmp_path: Path) -> None:
    assert run_shim(server.path, b"crash\0pw\0\0", tmp_path)[0] == 111
    assert run_shim(server.path, "alice\0right pw\u00e9\0\0".encode(), tmp_path)[0] == 0


def test_policy_too_slow_is_temporary(server: Server, tmp_path: Path) -> None:
    assert run_shim(server.path, b"slow\0pw\0\0", tmp_path)[0] == 111


def test_sidecar_down_exits_111(tmp_path: Path) -> None:
    code, _, err = run_shim(str(tmp_path / "nobody.sock"), b"alice\0pw\0\0", tmp_path)
    assert code == 111 and "unreachable" in err


def test_shim_timeout_exits_111(server: Server, tmp_path: Path) -> None:
    code, _, err = run_shim(server.path, b"slow\0pw\0\0", tmp_path, extra_args=("--timeout", "0.5"))
    assert code == 111 and "timed out" in err


@pytest.mark.parametrize(
    ("name", "fd3", "code"),
    [
        ("no fd 3", None, 2),
        ("empty", b"", 2),
        ("no terminators", b"alice", 2),
        ("missing final NUL", b"alice\0pw\0", 2),
        ("too many fields", b"a\0b\0c\0d\0\0", 2),
        ("with timestamp", b"nobody\0pw\x00123\0", 1),
        ("empty user", b"\0pw\0\0", 1),
        ("CR LF in user", b"al\r\nice\0pw\0\0", 1),
        ("oversized", b"a\0" + b"p" * 5000 + b"\0\0", 1),
    ],
)
def test_fd3_inputs(server: Server, tmp_path: Path, name: str, fd3: bytes | None, code: int) -> None:
    assert run_shim(server.path, fd3, tmp_path)[0] == code


def test_password_never_in_stderr_or_argv_of_the_reply(server: Server, tmp_path: Path) -> None:
    code, _, err = run_shim(server.path, b"crash\0sekrit-pw\0\0", tmp_path)
    assert code == 111 and "sekrit-pw" not in err


def test_malformed_request_gets_temp_and_server_survives(server: Server, tmp_path: Path) -> None:
    import socket

    for junk in (b"xx:garbage", b"5:AUTH1,", b"99999:"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(server.path)
            s.sendall(junk)
            data = s.recv(100)
        assert authproto.decode_reply(data).status == TEMP
    with socket.socket(socket.AF_UNIX) as s:  # a silent client is dropped after read_timeout
        s.settimeout(5)
        s.connect(server.path)
        assert s.recv(100) == b""
    assert run_shim(server.path, "alice\0right pw\u00e9\0\0".encode(), tmp_path)[0] == 0


def test_socket_mode(server: Server) -> None:
    assert os.stat(server.path).st_mode & 0o777 == 0o660


def test_console_script_entry_point_works_too(server: Server, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "autoport-checkpassword"
    if not script.exists():
        pytest.skip("console script not installed")
    p = spawn_with_fd3([str(script), "--socket", server.path, "/bin/true"], b"alice\0wrong\0\0")
    assert p.returncode == 1
