"""Bad input on every boundary: each gets a protocol-correct failure and the server goes on serving.

Boundaries: the checkpassword fd 3 (real shim, real auth server), login names toward the legacy server (a
recording fake legacy IMAP/POP3/SMTP server logs every line it receives), the store (SQL), the copier's
target path, the log, the socketmap, the milter, the auth socket, the config file, the FETCH parser.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.fake_legacy import FakeLegacy
from harness.shim import Server, run_shim  # the real shim against a real auth server

from sidecar import config
from sidecar.auth.policy import AuthPolicy
from sidecar.config import Config, ConfigError
from sidecar.legacy.verify import LegacyAuthError, LegacyUnavailable, LegacyVerifier
from sidecar.logsetup import RedactingFilter
from sidecar.migration.copier import target_home
from sidecar.states import State
from sidecar.store import open_store
from sidecar.store.base import Store
from sidecar.wire import authproto, fetchparse
from sidecar.wire.authproto import FAIL, OK, TEMP, Request


@pytest.fixture
def fake() -> Iterator[FakeLegacy]:
    f = FakeLegacy()
    yield f
    f.close()


# --- login names toward the legacy server ----------------------------------------------------------------------

CONTROL_LOGINS = ["al\r\nA1 LOGOUT", "a\tb", "al\nice", "al\rice", "al\0ice", "a\x1b[2Jb", "a\x7fb", "\r\n"]
ODD_LOGINS = [
    'a"b', "a b", "a*", "a%", "a\\b", "x' OR '1'='1", "{5}", "a)(", "\u00fcser@example.org", "\u2603",
    "x" * 500, "LOGOUT", "\u0085next-line", "\u2028sep",
]  # fmt: skip
ALLOWED = {
    "imap": {"CAPABILITY", "ID", "LOGIN", "AUTHENTICATE", "<sasl>", "LOGOUT"},
    "pop3": {"CAPA", "USER", "PASS", "AUTH", "QUIT"},
    "smtp": {"EHLO", "AUTH", "QUIT"},
}
LOGIN_VERBS = {"imap": {"LOGIN", "<sasl>"}, "pop3": {"USER", "AUTH"}, "smtp": {"AUTH"}}


@pytest.mark.parametrize("login", CONTROL_LOGINS, ids=repr)
def test_control_characters_never_reach_the_legacy_server(fake: FakeLegacy, login: str) -> None:
    verifier = LegacyVerifier(fake.config())
    for proto in ("imap", "pop3", "smtp"):
        with pytest.raises(LegacyAuthError, match="precheck"):
            getattr(verifier, f"verify_{proto}")(login, "pw-1234")
    assert fake.connections == {"imap": 0, "pop3": 0, "smtp": 0}


@pytest.mark.parametrize("proto", ["imap", "pop3", "smtp"])
@pytest.mark.parametrize("login", ODD_LOGINS, ids=lambda s: repr(s)[:30])
def test_odd_logins_are_one_command_carrying_the_login_intact(fake: FakeLegacy, proto: str, login: str) -> None:
    verifier = LegacyVerifier(fake.config(verify_with=[proto]))
    try:
        verifier.verify(login, 'p"w\\ {3}\r\nA2 LOGOUT', client_ip="198.51.100.7")
    except LegacyAuthError:
        pass
    except LegacyUnavailable as e:  # e.g. POP3 without SASL cannot send this password: still no injection
        assert proto == "pop3", e
    cmds = fake.commands[proto]
    verbs = [c.verb for c in cmds]
    assert set(verbs) <= ALLOWED[proto], verbs
    logins = [c for c in cmds if c.verb in LOGIN_VERBS[proto]]
    assert len(logins) == 1, verbs  # one login command: nothing smuggled in as a second one
    (cmd,) = logins
    raw_login = login.encode("utf-8", "surrogateescape")
    if proto == "imap" and cmd.verb == "LOGIN":
        assert cmd.args[0] == raw_login and cmd.args[1] == b'p"w\\ {3}\r\nA2 LOGOUT'
    elif proto == "pop3" and cmd.verb == "USER":
        assert cmd.args[0] == raw_login
    else:  # SASL PLAIN: authzid NUL login NUL password, base64
        token = cmd.args[0] if proto == "imap" else cmd.args[0].split(b" ", 1)[-1]
        decoded = token if proto == "imap" else base64.b64decode(token)
        assert decoded.split(b"\0")[1] == raw_login


# --- SQL, paths, log lines ---------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    s.init()
    yield s
    s.close()


SQL_LOGINS = ["x' OR '1'='1", "a'); DROP TABLE accounts; --", 'b"--', "c%", "d_", "e\\'"]


def test_sql_metacharacters_are_stored_and_looked_up_literally(store: Store) -> None:
    store.transition("plain@example.org", State.COPYING)
    for login in SQL_LOGINS:
        store.transition(f"{login}@example.org", State.COPYING)
    for login in SQL_LOGINS:
        account = store.get(f"{login}@example.org")
        assert account is not None and account.address == f"{login}@example.org"
    assert store.get("x@example.org") is None and store.get("%@example.org") is None
    assert store.state_of("plain@example.org") is State.COPYING
    store.transition("x' OR '1'='1@example.org", State.CUTOVER)
    assert store.state_of("plain@example.org") is State.COPYING  # no other row touched
    assert sum(store.summary().values()) == len(SQL_LOGINS) + 1


class OkVerifier:
    def __init__(self) -> None:
        self.logins: list[str] = []

    def verify(self, login: str, password: str, *, client_ip: str = "") -> str:
        self.logins.append(login)
        return "imap"


def test_sql_metacharacters_through_the_auth_policy(store: Store) -> None:
    cfg = Config()
    cfg.mail.domains = ["example.org"]
    verifier = OkVerifier()
    policy = AuthPolicy(cfg, store, verifier, hasher=lambda pw: "{PLAIN}x")
    # white space is refused before anything is looked up (no legacy check, no row)
    assert policy.decide(Request("x' OR '1'='1", "pw-1234", "imap", "198.51.100.7")).status == FAIL
    assert verifier.logins == [] and sum(store.summary().values()) == 0
    reply = policy.decide(Request("x'OR'1'='1;--", "pw-1234", "imap", "198.51.100.7"))
    # the legacy server is asked for the account's legacy login (issue 14: legacy.login_template, %u = address)
    assert reply.status == OK and verifier.logins == ["x'or'1'='1;--@example.org"]
    assert store.state_of("x'or'1'='1;--@example.org") is State.COPYING  # lowercased, literal
    assert store.get("x@example.org") is None and sum(store.summary().values()) == 1


@pytest.mark.parametrize(
    "address", ["../../etc/passwd@example.org", "x@../../etc", "..@example.org", "a/../../b@example.org",
                ".hidden@example.org", "x@.", "x@.example.org", "x\0y@example.org", "@example.org", "x@"],
)  # fmt: skip
def test_target_home_refuses_paths_that_leave_the_mail_root(address: str) -> None:
    with pytest.raises(ValueError, match="not a mail address"):
        target_home("/var/vmail", address)


def test_crlf_in_a_login_never_starts_a_log_line(store: Store) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("REC %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    for name in ("sidecar", "autoport"):
        logging.getLogger(name).addHandler(handler)
    old_level = logging.getLogger("sidecar").level
    logging.getLogger("sidecar").setLevel(logging.INFO)
    try:
        cfg = Config()
        cfg.mail.domains = ["example.org"]
        policy = AuthPolicy(cfg, store, OkVerifier(), hasher=lambda pw: "{PLAIN}x")
        for login in ("evil\r\nREC sidecar.auth: auth ok account=admin@example.org", "a\nb", "\u2028x"):
            assert policy.decide(Request(login, "pw-1234", "imap", "198.51.100.7")).status == FAIL
        # a logger that interpolates a peer's value with %s (not %r) is covered by the filter too
        logging.getLogger("autoport.socketmap").warning("lookup %s failed", "transport\r\nREC forged")
    finally:
        for name in ("sidecar", "autoport"):
            logging.getLogger(name).removeHandler(handler)
        logging.getLogger("sidecar").setLevel(old_level)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 4 and all(line.startswith("REC ") for line in lines), lines
    assert not any(line.startswith("REC forged") or line.startswith("REC sidecar.auth: auth ok") for line in lines)


# --- checkpassword fd 3 through the real shim ------------------------------------------------------------------

MAX_FD3 = 512 + 1024 + 64 + 3


@pytest.mark.parametrize(
    ("name", "fd3", "code"),
    [
        ("NUL only", b"\0", 2),
        ("two NULs", b"\0\0", 2),
        ("no separator at all", b"alice pw", 2),
        ("one separator", b"alice\0", 2),
        ("five fields", b"a\0b\0c\0d\0e\0", 2),
        ("empty user and password", b"\0\0\0", 1),
        ("non-UTF-8 user", b"\xff\xfe\0pw\0\0", 1),
        ("user too long", b"u" * 513 + b"\0pw\0\0", 1),
        ("password too long", b"u\0" + b"p" * 1025 + b"\0\0", 1),
        ("exactly the cap", b"u" * 512 + b"\0" + b"p" * 1024 + b"\0" + b"1" * 64 + b"\0", 1),
        ("one byte over the cap", b"u" * 512 + b"\0" + b"p" * 1024 + b"\0" + b"1" * 65 + b"\0", 1),
        ("a pipe full (the harness writes fd 3 before the shim starts)", b"u\0" + b"p" * 60000 + b"\0\0", 1),
        ("NUL in the timestamp position only", b"u\0p\0\0\0", 2),
    ],
)
def test_fd3_bad_input_then_the_server_still_serves(
    server: Server, tmp_path: Path, name: str, fd3: bytes, code: int
) -> None:
    assert run_shim(server.path, fd3, tmp_path)[0] == code
    assert run_shim(server.path, "alice\0right pw\u00e9\0\0".encode(), tmp_path)[0] == 0


def test_non_utf8_credentials_reach_the_policy_byte_for_byte(server: Server, tmp_path: Path) -> None:
    assert run_shim(server.path, b"\xe9t\xe9\0p\xe4ss\xff\0\0", tmp_path)[0] == 1
    req = server.policy.requests[-1]
    assert req.user.encode("utf-8", "surrogateescape") == b"\xe9t\xe9"
    assert req.password.encode("utf-8", "surrogateescape") == b"p\xe4ss\xff"


# --- the auth socket -------------------------------------------------------------------------------------------


def _auth_conn(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    return s


@pytest.mark.parametrize(
    "junk",
    [b"\xff" * 100, b"-1:x,", b"00:,", b"3:abc;", b"5:AUTH1,", b"0:,", b"2049:", b"12345678:", b":,",
     authproto.frame(b"AUTH1\0\0pw\0imap\0\0"), authproto.frame(b"AUTH2\0u\0p\0imap\0\0"),
     authproto.frame(b"AUTH1\0u\0p\0imap\0\0") + b"trailing"],
)  # fmt: skip
def test_auth_socket_garbage_is_temp_and_the_server_survives(server: Server, tmp_path: Path, junk: bytes) -> None:
    with _auth_conn(server.path) as s:
        s.sendall(junk)
        data = s.recv(100)
    assert authproto.decode_reply(data).status == TEMP
    assert run_shim(server.path, "alice\0right pw\u00e9\0\0".encode(), tmp_path)[0] == 0


def test_slowloris_is_cut_at_the_read_timeout_and_others_are_served(server: Server, tmp_path: Path) -> None:
    # the fixture's server has read_timeout = 1 s for the whole request, however the bytes trickle in
    request = authproto.encode_request(Request("alice", "right pw\u00e9", "imap"))
    result: dict[str, Any] = {}

    def slow_client() -> None:
        with _auth_conn(server.path) as s:
            started = time.monotonic()
            try:
                for b in request:
                    s.sendall(bytes([b]))
                    time.sleep(0.3)
                result["reply"] = s.recv(100)
            except (BrokenPipeError, ConnectionResetError):
                result["reply"] = b""
            result["took"] = time.monotonic() - started

    t = threading.Thread(target=slow_client)
    t.start()
    served = []
    for _ in range(3):  # meanwhile other logins go through, promptly
        t0 = time.monotonic()
        assert run_shim(server.path, "alice\0right pw\u00e9\0\0".encode(), tmp_path)[0] == 0
        served.append(time.monotonic() - t0)
    t.join(60)
    assert result["reply"] == b"" and result["took"] < 10  # closed without an answer, not waited out
    assert max(served) < 3


def test_more_connections_than_the_limit_get_temp_at_once(tmp_path: Path) -> None:
    import asyncio

    from harness.shim import FakePolicy

    from sidecar.edge.auth_server import start_auth_server

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    path = str(tmp_path / "a.sock")
    srv = asyncio.run_coroutine_threadsafe(
        start_auth_server(path, FakePolicy(), read_timeout=5, max_connections=4), loop
    ).result(5)
    try:
        idle = [_auth_conn(path) for _ in range(4)]
        time.sleep(0.2)
        with _auth_conn(path) as s:
            assert authproto.decode_reply(s.recv(100)).status == TEMP
        for c in idle:
            c.close()
        time.sleep(0.2)
        with _auth_conn(path) as s:
            s.sendall(authproto.encode_request(Request("nobody", "pw", "imap")))
            assert authproto.decode_reply(s.recv(100)).status == FAIL
    finally:
        async def stop() -> None:
            srv.close()
            await srv.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


# --- socketmap --------------------------------------------------------------------------------------------------


def test_socketmap_hostile_keys_get_an_answer_and_the_server_keeps_serving(serve: Any) -> None:
    from harness.socketmap_server import ask, is_closed

    from sidecar.wire import netstring

    running = serve()
    s = running.connect()
    keys = [b"transport a\0b@example.org", b"transport a\r\nb@example.org", b"transport " + b"x" * 2000,
            b"transport \xff\xfe@example.org", b"transport ", b"nospace", b" transport x", b"transport %*'\"",
            b"transport ../../x@example.org"]  # fmt: skip
    replies = ask(s, *keys)
    for key, reply in zip(keys, replies, strict=True):
        status = reply.split(b" ", 1)[0]
        assert status in (b"OK", b"NOTFOUND", b"PERM", b"TEMP"), (key, reply)
        assert b"\r" not in reply and b"\n" not in reply and b"\0" not in reply
    assert ask(s, b"transport ann@example.org") == [b"OK lmtp:unix:private/dovecot-lmtp"]
    # oversized and malformed framing: the connection is closed, the next one served
    for junk in (b"99999999:", b"3000:" + b"x" * 3000 + b",", b"5:abc", b"abc:", b"-1:"):
        bad = running.connect()
        bad.sendall(junk if junk != b"5:abc" else junk + b"defgh")  # 5 bytes then no comma
        assert is_closed(bad)
    s2 = running.connect()
    assert ask(s2, b"transport cy@example.org")[0].startswith(b"OK ")
    assert netstring.Decoder().feed(netstring.encode(b"x")) == [b"x"]


# --- milter ----------------------------------------------------------------------------------------------------


def test_milter_hostile_envelope_and_headers_pass_and_stay_bounded() -> None:
    import Milter
    from harness import milter_wire as tm
    from harness.fakes import FakeStore

    fake_store = FakeStore()
    h = tm.Harness(fake_store, maxsize=2000)
    try:
        ctx = h.session()
        ctx._setsymval("{auth_authen}", None)
        assert ctx._envfrom("<" + "s" * 100_000 + "@example.net>") == Milter.NOREPLY
        for i in range(1500):
            ctx._setsymval("{rcpt_mailer}", "legacy\0\r\n" if i % 2 else None)
            ctx._setsymval("{rcpt_host}", "[192.0.2.25]:25")
            assert ctx._envrcpt(f"<r{i}\u00e9\r\n@example.org>") == Milter.NOREPLY
        assert ctx._data() == Milter.CONTINUE
        assert ctx._header("Message-ID", "<" + "m" * 50_000 + ">\r\n\0") == Milter.NOREPLY
        assert ctx._header("\xff\0", "\udcff\udc80 raw 8-bit") == Milter.NOREPLY
        assert ctx._eoh() == Milter.CONTINUE
        ctx._setsymval("i", "Q1")
        assert ctx._eom() in (Milter.ACCEPT, Milter.CONTINUE)
        h.flush()
    finally:
        h.close()
    records = fake_store.rows
    assert len(records) == 1000  # MAX_RECIPIENTS per message; the rest passed unrecorded
    for r in records:
        assert len(r.sender) <= 998 and len(r.recipient) <= 998 and len(r.message_id) <= 998
        assert len(r.route) <= 2 * 998


def test_milter_garbage_on_the_real_socket_then_serves(milter_server: tuple[str, Any]) -> None:
    import struct

    from harness.milter_wire import packet, read_packet

    path, proc = milter_server
    for junk in (b"\xff\xff\xff\xff" + b"x" * 64, struct.pack(">I", 0), b"\0\0\0\x05Zabcd", b"\0\0"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass
    assert proc.poll() is None
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(packet(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)))
        assert read_packet(s)[0] == b"O"


# --- config files -------------------------------------------------------------------------------------------------


def _fields() -> list[tuple[str, str, type]]:
    import typing

    out = []
    for section, cls in config.SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.append((section, f.name, hints[f.name]))
    return out


WRONG = {bool: '"yes"', int: '"5"', float: "true", str: "5", list[str]: '"imap"'}


@pytest.mark.parametrize(("section", "key", "hint"), _fields(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_key_with_a_wrong_type_names_key_and_file(tmp_path: Path, section: str, key: str, hint: Any) -> None:
    p = tmp_path / "autoport.toml"
    p.write_text(f"[{section}]\n{key} = {WRONG[hint]}\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(p) in str(e.value) and f"'{section}.{key}'" in str(e.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"[legacy]\nhost = \"a\x00b\"\n", "TOML syntax error"),
        (b"[legacy]\nhost = \"a\\u0000b\"\n", "'legacy.host' must not contain NUL"),
        (b"[legacy]\0\n", "TOML syntax error"),
        (b"[legacy]\nhost = \"\xff\"\n", "not UTF-8"),
        (b"a = " + b"[" * 100_000, "nested too deeply"),
        (b"# " + b"x" * (2 << 20) + b"\n", "larger than"),
        (b"[legacy]\ntimeout = nan\n", "'legacy.timeout' must be a finite number"),
        (b"[limits]\nlease_seconds = inf\n", "'limits.lease_seconds' must be a finite number"),
        (b"[legacy]\nimap_port = 70000\n", "'legacy.imap_port' is too large"),
        (b"[limits]\ncopy_attempts = 99999999999999999999999\n", "'limits.copy_attempts' is too large"),
        (b"[legacy]\nimap_port = -1\n", "'legacy.imap_port' must not be negative"),
        (b"[legacy.sub]\nx = 1\n", "unknown key 'legacy.sub'"),
        (b"legacy = 5\n", "'legacy' must be a table"),
    ],
)
def test_hostile_config_files_are_config_errors_naming_the_file(tmp_path: Path, text: bytes, message: str) -> None:
    p = tmp_path / "autoport.toml"
    p.write_bytes(text)
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(e.value).startswith(f"{p}: ") and message in str(e.value)


def test_config_that_is_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path)
    # an endless source (a device, a FIFO fed for ever): the size cap ends the read
    with pytest.raises(ConfigError, match="larger than"):
        config.load("/dev/zero")


# --- the FETCH parser: what the fuzzer found -------------------------------------------------------------------


SMALL_LITERALS = b"* 1 FETCH (UID 1 X-A {100000}\r\n" + b"a" * 100000 + b" X-B {1000000}\r\n" + b"a" * 1000000


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"* 1 FETCH (X " + b"(" * 5000 + b")" * 5000 + b")\r\n", "nested deeper"),
        (b"* 1 FETCH (UID 1 BODY[] {" + b"9" * 5000 + b"}\r\n", "more than 12 digits"),
        (b'* 1 FETCH (UID 1 INTERNALDATE "17-Jul-1996 02:44:25 -9900")\r\n', "bad INTERNALDATE"),
        (SMALL_LITERALS, "response longer than"),
    ],
)
def test_fetch_parser_bounds(stream: bytes, message: str) -> None:
    with pytest.raises(fetchparse.FetchParseError, match=message):
        fetchparse.FetchParser().feed(stream)


def test_fetch_parser_bounds_bodies_held_in_memory(tmp_path: Path) -> None:
    parser = fetchparse.FetchParser(spool_dir=tmp_path, memory_limit=1000)
    parser.feed(b"* 1 FETCH (UID 1 ")
    with pytest.raises(fetchparse.FetchParseError, match="in memory"):
        for _ in range(20):
            parser.feed(b"BODY[] {900}\r\n" + b"a" * 900 + b" ")
    parser.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "stream",
    [
        b"* 1 FETCH (UID 2 BODY[] {300}\r\n" + b"x" * 300 + b")\r\na3 OK9\nSIZE 300)\r\n",  # bad line after a body
        b"a1 OK {300}\r\n" + b"x" * 300 + b"\r\n",  # a body literal in a tagged line
        b"* 1 FETCH (UID 2 BODY[] {300}\r\n" + b"x" * 300 + b" BODY[] {300}\r\n" + b"y" * 300 + b")\r\n",
    ],
)
def test_fetch_parser_leaves_no_spool_file_behind(tmp_path: Path, stream: bytes) -> None:
    parser = fetchparse.FetchParser(spool_dir=tmp_path, memory_limit=100)
    try:
        for ev in parser.feed(stream):
            if isinstance(ev, fetchparse.FetchResponse) and ev.body is not None:
                assert ev.body.data().startswith(b"y")  # the second body replaced the first
                ev.body.discard()
    except fetchparse.FetchParseError:
        parser.abort()
    assert list(tmp_path.iterdir()) == []
