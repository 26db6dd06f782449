"""The real shim as Dovecot runs it (subprocess, fd 3, environment) against a real AuthServer socket."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from harness.shim import Server, run_shim, spawn_with_fd3

from sidecar.wire import authproto
from sidecar.wire.authproto import TEMP


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
