"""The ManageSieve client against a scripted server: literals, an oversized script, refusals, hang-ups.

What an operator sees: which script was left behind and why, and never the password in an error.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.config import LegacyConfig
from sidecar.legacy import managesieve
from sidecar.migration import sieve

GREETING = b'"IMPLEMENTATION" "test"\r\n"SASL" "PLAIN"\r\n"SIEVE" "fileinto vacation"\r\nOK "ready"\r\n'
FILTERS = b'require "fileinto";\r\nfileinto "Junk";\r\n'
BIG = 2 << 20


class Server:
    """One connection: the greeting, then a canned reply per command (prefix match); records commands."""

    def __init__(self, replies: dict[bytes, bytes]) -> None:
        self.replies = replies
        self.commands: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.sendall(GREETING)
            buf = b""
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while b"\r\n" in buf:
                    line, buf = buf.split(b"\r\n", 1)
                    self.commands.append(line)
                    for prefix, reply in self.replies.items():
                        if line.startswith(prefix):
                            conn.sendall(reply)
                            break
                    else:
                        conn.sendall(b'NO "unknown"\r\n')
                    if line == b"LOGOUT":
                        return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server_factory() -> Iterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for s in servers:
        s.close()


def legacy(port: int) -> LegacyConfig:
    return LegacyConfig(host="127.0.0.1", sieve_port=port, sieve_tls="none", timeout=5)


def start(servers: list[Server], replies: dict[bytes, bytes]) -> Server:
    s = Server(replies)
    servers.append(s)
    return s


def test_scripts_with_literal_names_and_an_oversized_one(server_factory: list[Server], tmp_path: Path) -> None:
    big = b"#" * BIG
    srv = start(server_factory, {
        b"AUTHENTICATE": b"OK\r\n",
        b"LISTSCRIPTS": b'"filters" ACTIVE\r\n{4}\r\nhuge\r\n"other name"\r\nOK\r\n',
        b'GETSCRIPT "filters"': b"{%d}\r\n%s\r\nOK\r\n" % (len(FILTERS), FILTERS),
        b'GETSCRIPT "huge"': b"{%d}\r\n%s\r\nOK\r\n" % (len(big), big),
        b'GETSCRIPT "other name"': b'{3}\r\nx\r\n\r\nOK\r\n',
        b"LOGOUT": b'OK "bye"\r\n',
    })  # fmt: skip
    result = sieve.copy_scripts(legacy(srv.port), "alice@example.test", "s3cret", tmp_path, owner=None)
    assert result.active == "filters"
    assert result.scripts == {"filters": FILTERS, "other name": b"x\r\n"}
    assert len(result.skipped) == 1 and "'huge'" in result.skipped[0] and "too big" in result.skipped[0]
    # Pigeonhole's layout: scripts in ~/sieve, the active one linked from ~/.dovecot.sieve
    assert (tmp_path / "sieve" / "filters.sieve").read_bytes() == FILTERS
    assert (tmp_path / "sieve" / "other name.sieve").read_bytes() == b"x\r\n"
    assert os.readlink(tmp_path / ".dovecot.sieve") == "sieve/filters.sieve"
    assert (tmp_path / "sieve" / "filters.sieve").stat().st_mode & 0o777 == 0o600


def test_refused_login_names_the_user_never_the_password(server_factory: list[Server], tmp_path: Path) -> None:
    srv = start(server_factory, {b"AUTHENTICATE": b'NO "Authentication failed."\r\n'})
    with pytest.raises(managesieve.SieveAuthError) as e:
        sieve.copy_scripts(legacy(srv.port), "alice@example.test", "s3cret-pw", tmp_path, owner=None)
    assert "alice@example.test" in str(e.value)
    assert "s3cret-pw" not in str(e.value)
    assert not (tmp_path / "sieve").exists()


def test_admin_login_uses_authzid_or_master_separator(server_factory: list[Server], tmp_path: Path) -> None:
    import base64

    for mode, expect in (("authzid", b"alice@example.test\0admin\0pw"), ("master", b"\0alice@example.test*admin\0pw")):
        srv = start(server_factory, {b"AUTHENTICATE": b"OK\r\n", b"LISTSCRIPTS": b"OK\r\n", b"LOGOUT": b"OK\r\n"})
        cfg = LegacyConfig(host="127.0.0.1", sieve_port=srv.port, sieve_tls="none", admin_user="admin",
                           admin_password="pw", admin_mode=mode)  # fmt: skip
        result = sieve.copy_scripts(cfg, "alice@example.test", "", tmp_path / mode, owner=None, use_admin=True)
        assert result.scripts == {} and result.active is None
        blob = srv.commands[0].split(b'"')[3]
        assert base64.b64decode(blob) == expect


def test_bye_and_hangup_are_temporary(server_factory: list[Server], tmp_path: Path) -> None:
    srv = start(server_factory, {b"AUTHENTICATE": b'BYE (TRYLATER) "shutting down"\r\n'})
    with pytest.raises(managesieve.SieveUnavailable, match="BYE TRYLATER shutting down"):
        sieve.copy_scripts(legacy(srv.port), "alice@example.test", "pw", tmp_path, owner=None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(managesieve.SieveUnavailable, match="cannot connect"):
        sieve.copy_scripts(legacy(port), "alice@example.test", "pw", tmp_path, owner=None)


def test_starttls_required_but_not_offered(server_factory: list[Server], tmp_path: Path) -> None:
    srv = start(server_factory, {})
    cfg = LegacyConfig(host="127.0.0.1", sieve_port=srv.port, sieve_tls="starttls", timeout=5)
    with pytest.raises(managesieve.SieveUnavailable, match="does not offer STARTTLS"):
        sieve.copy_scripts(cfg, "alice@example.test", "pw", tmp_path, owner=None)


def test_unsafe_script_names_are_left_behind(server_factory: list[Server], tmp_path: Path) -> None:
    srv = start(server_factory, {
        b"AUTHENTICATE": b"OK\r\n",
        b"LISTSCRIPTS": b'"../escape" ACTIVE\r\n".hidden"\r\nOK\r\n',
        b"LOGOUT": b"OK\r\n",
    })  # fmt: skip
    result = sieve.copy_scripts(legacy(srv.port), "alice@example.test", "pw", tmp_path, owner=None)
    assert result.scripts == {} and result.active is None
    assert len(result.skipped) == 2
    assert not (tmp_path / "escape.sieve").exists() and not (tmp_path / ".dovecot.sieve").exists()


def test_fileinto_folders_renamed_as_the_target_shows_them() -> None:
    from sidecar.migration.sieve import rewrite_fileinto

    script = (
        b'require ["fileinto", "imap4flags", "copy"];\n'
        b'if header :contains "X-Spam-Flag" "YES" { fileinto "INBOX.Junk"; stop; }\n'
        b'if true { fileinto :copy :flags ["\\\\Seen", "x"] "INBOX.Archive.2023"; fileinto "INBOX.Keep \\"q\\""; }\n'
        b'fileinto "INBOX.Entw\xc3\xbcrfe";\n'
    )
    names = {"INBOX.Junk": "Junk", "INBOX.Archive.2023": "Archive/2023", 'INBOX.Keep "q"': 'Keep "q"',
             "INBOX.Entwürfe": "Drafts", "INBOX.Other": "Other"}  # fmt: skip
    out, changed = rewrite_fileinto(script, names)
    assert out == (
        b'require ["fileinto", "imap4flags", "copy"];\n'
        b'if header :contains "X-Spam-Flag" "YES" { fileinto "Junk"; stop; }\n'
        b'if true { fileinto :copy :flags ["\\\\Seen", "x"] "Archive/2023"; fileinto "Keep \\"q\\""; }\n'
        b'fileinto "Drafts";\n'
    )
    assert changed == ["INBOX.Junk -> Junk", "INBOX.Archive.2023 -> Archive/2023", 'INBOX.Keep "q" -> Keep "q"',
                       "INBOX.Entwürfe -> Drafts"]  # fmt: skip
    assert rewrite_fileinto(script, {}) == (script, [])
