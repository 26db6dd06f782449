"""`autoport inventory --from legacy` against a scripted Cyrus-style IMAP server (personal "INBOX.", other users
"user.", shared ""), the layout the lab's Dovecot does not have: a name with "^" for ".", a user's subfolders
and the personal/other-users folders that the empty shared prefix also lists are not taken for accounts or
shared folders. The admin logs in as itself with LOGIN; its password never reaches the output."""

from __future__ import annotations

import contextlib
import re
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar import config as config_mod
from sidecar.ops import inventory
from sidecar.ops.actions import OpsError

ADMIN_PASSWORD = "cyrus-Adm1n-pw"
FOLDERS = [
    "INBOX", "INBOX.Sent", "user.alice", "user.alice.Sent", "user.bob", "user.jean^luc", "user.jean^luc.Trash",
    "Sales", "Sales.2024", "Announcements",
]  # fmt: skip


class CyrusLike(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    namespace = b'* NAMESPACE (("INBOX." ".")) (("user." ".")) (("" "."))'
    logins: list[bytes]


class Handler(socketserver.StreamRequestHandler):
    server: CyrusLike

    def send(self, line: bytes) -> None:
        self.wfile.write(line + b"\r\n")

    def handle(self) -> None:
        self.send(b"* OK [CAPABILITY IMAP4rev1 NAMESPACE LITERAL+ AUTH=PLAIN] cyrus-like ready")
        authed = False
        for raw in self.rfile:
            tag, _, rest = raw.rstrip(b"\r\n").partition(b" ")
            verb, _, args = rest.partition(b" ")
            verb = verb.upper()
            if verb == b"CAPABILITY":
                self.send(b"* CAPABILITY IMAP4rev1 NAMESPACE LITERAL+ AUTH=PLAIN")
                self.send(tag + b" OK done")
            elif verb == b"LOGIN":
                self.server.logins.append(args)
                authed = args == b'admin "' + ADMIN_PASSWORD.encode() + b'"' or args == (
                    b"admin " + ADMIN_PASSWORD.encode()
                )
                self.send(tag + (b" OK logged in" if authed else b" NO [AUTHENTICATIONFAILED] bad"))
            elif verb == b"NAMESPACE" and authed:
                self.send(self.server.namespace)
                self.send(tag + b" OK done")
            elif verb == b"LIST" and authed:
                m = re.match(rb'"" "?([^"]*)"?$', args)
                assert m, args
                pattern = m.group(1).decode()
                rx = "^" + re.escape(pattern).replace(r"\*", ".*").replace("%", "[^.]*") + "$"
                for name in FOLDERS:
                    if re.match(rx, name):
                        self.send(b'* LIST (\\HasNoChildren) "." "' + name.encode() + b'"')
                self.send(tag + b" OK done")
            elif verb == b"LOGOUT":
                self.send(b"* BYE")
                self.send(tag + b" OK bye")
                return
            else:
                self.send(tag + b" BAD unexpected")


@pytest.fixture
def cyrus() -> Iterator[CyrusLike]:
    srv = CyrusLike(("127.0.0.1", 0), Handler)
    srv.logins = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(10)


def cfg_for(tmp_path: Path, port: int, password: str = ADMIN_PASSWORD) -> config_mod.Config:
    p = tmp_path / "autoport.toml"
    p.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path}/state.db"\n[mail]\ndomains = ["example.org"]\n'
        f'[legacy]\nhost = "127.0.0.1"\nimap_port = {port}\nimap_tls = "none"\nadmin_user = "admin"\n'
        f'admin_password = "{password}"\nadmin_mode = "authzid"\n'
    )
    return config_mod.load(p)


def test_cyrus_style_listing(cyrus: CyrusLike, tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, cyrus.server_address[1])
    listing = inventory.list_legacy(cfg)
    assert listing.accounts == {
        "alice@example.org": "user.alice",
        "bob@example.org": "user.bob",
        "jean.luc@example.org": "user.jean^luc",
    }
    assert set(listing.shared_folders) == {"Sales", "Sales.2024", "Announcements"}
    assert len(cyrus.logins) == 1 and cyrus.logins[0].startswith(b"admin ")


def test_no_other_users_namespace_or_a_refused_admin_is_explained(cyrus: CyrusLike, tmp_path: Path) -> None:
    wrong = "wrong-" + ADMIN_PASSWORD
    with pytest.raises(OpsError) as e:
        inventory.list_legacy(cfg_for(tmp_path, cyrus.server_address[1], wrong))
    assert str(e.value).endswith("legacy IMAP login refused for admin") and wrong not in str(e.value)
    cyrus.namespace = b'* NAMESPACE (("" "/")) NIL NIL'
    with pytest.raises(OpsError, match="no other-users namespace"):
        inventory.list_legacy(cfg_for(tmp_path, cyrus.server_address[1]))


def test_unreachable_legacy_server(tmp_path: Path) -> None:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OpsError, match="listing the legacy accounts failed"):
        inventory.list_legacy(cfg_for(tmp_path, port))
