"""Seed inputs per target: valid (and nearly valid) messages of each codec. The first byte of the chunked
targets' inputs picks the chunk size (see targets._chunks)."""

from __future__ import annotations

from pathlib import Path

from sidecar.wire import authproto, netstring
from sidecar.wire.authproto import Reply, Request

_EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _chunked(messages: list[bytes]) -> list[bytes]:
    return [bytes([c]) + m for m in messages for c in (0, 1, 7)]


_REQUESTS = [
    authproto.encode_request(Request("alice@example.org", "pw", "imap", "198.51.100.7", "192.0.2.1")),
    authproto.encode_request(Request("b", "p\r\nw \u00e9\udcff", "pop3", "", "")),
    authproto.encode_request(Request("x" * authproto.MAX_USER, "y" * authproto.MAX_PASSWORD, "smtp", "::1", "::1")),
]
_REPLIES = [
    authproto.encode_reply(
        Reply("OK", {"proxy": "y", "host": "192.0.2.10", "port": "143", "pass": "a\r\nb", "userdb_uid": "5000"})
    ),
    authproto.encode_reply(Reply("FAIL")),
    authproto.encode_reply(Reply("TEMP")),
]
_SOCKETMAP = [b"transport alice@example.org", b"virtual bob@example.org", b"verify x@y", b"transport "]
_FETCH = [
    b"* 1 FETCH (UID 7 FLAGS (\\Seen $Label1) INTERNALDATE \"17-Jul-1996 02:44:25 -0700\" RFC822.SIZE 12 "
    b"BODY[] {12}\r\nHello world!)\r\n* 2 FETCH (UID 9 FLAGS () BODY[] {0}\r\n)\r\na1 OK done\r\n",
    b"* 3 EXISTS\r\n* 1 FETCH (UID 1 BODY[HEADER] {5}\r\nSubj:)\r\n* 1 FETCH (FLAGS (\\Deleted))\r\na2 NO x\r\n",
    b"* 1 FETCH (UID 2 BODY[] {300}\r\n" + b"x" * 300 + b" RFC822.SIZE 300)\r\na3 OK\r\n",
    b"* 1 FETCH (UID 3 BODY[] \"quoted body\" X-GM-LABELS (\"a\" NIL (b)))\r\na4 BAD no\r\n",
]
_FD3 = [b"alice\0pw\0\0", b"alice\0pw\x001700000000\0", b"\0\0\0", b"u\xff\xfe\0p\r\n\0\0", b"a\0b\0"]
_CONFIG = [
    b"",
    b'[legacy]\nhost = "192.0.2.25"\nimap_port = 143\ntimeout = 10.0\nverify_with = ["imap", "pop3"]\n'
    b'tls_verify = true\n[mail]\ndomains = ["example.org"]\n[limits]\nauth_concurrency = 16\n',
    b'[store]\nurl = "sqlite:////var/lib/autoport/state.db"\n[log]\ndestination = "stderr"\nlevel = "info"\n',
    b'[sockets]\nmode = 0o660\nauth = "/run/autoport/auth.sock"\n[dashboard]\nlisten = ""\ntoken = "t"\n',
]
for _example in sorted(_EXAMPLES.glob("*.toml")):
    _CONFIG.append(_example.read_bytes())

SEEDS: dict[str, list[bytes]] = {
    "authproto_request": _chunked(_REQUESTS),
    "authproto_reply": _chunked(_REPLIES),
    "netstring": _chunked([b"".join(netstring.encode(p) for p in _SOCKETMAP), b"0:,3:abc,", b"5:ab"]),
    "socketmap_request": _SOCKETMAP,
    "fetchparse": _chunked(_FETCH),
    "checkpassword_fd3": _FD3,
    "config": _CONFIG,
}
