"""Wire codec between autoport-checkpassword (the shim) and the sidecar's auth socket. Pure: no I/O.

More (the reasons and limits behind this module): docs/modules.md, sidecar/wire/authproto.py.
"""

MAGIC = b"AUTH1"
OK = "OK"
FAIL = "FAIL"
TEMP = "TEMP"
STATUSES = (OK, FAIL, TEMP)

MAX_USER = 512
MAX_PASSWORD = 1024
MAX_SERVICE = 32
MAX_IP = 64
MAX_REQUEST = 2048  # payload bytes; the largest valid request fits (5+512+1024+32+64+64+5 separators)
MAX_REPLY = 8192  # payload bytes
MAX_FIELDS = 32  # extra fields in a reply
MAX_KEY = 32
MAX_VALUE = 2048
_LEN_DIGITS = 5  # enough for either bound

_KEY_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_")
_DIGITS = frozenset(b"0123456789")


class ProtocolError(ValueError):
    """Bytes that are not a valid message. The message never contains field contents (they may be secret)."""


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _check(name: str, raw: bytes, limit: int, *, crlf: bool = False) -> None:
    if len(raw) > limit:
        raise ProtocolError(f"{name} longer than {limit} bytes")
    if b"\0" in raw:
        raise ProtocolError(f"{name} contains NUL")
    if not crlf and (b"\r" in raw or b"\n" in raw):
        raise ProtocolError(f"{name} contains CR or LF")


class Request:
    """One authentication attempt as Dovecot handed it to the shim."""

    __slots__ = ("local_ip", "password", "remote_ip", "service", "user")

    def __init__(self, user: str, password: str, service: str = "", remote_ip: str = "", local_ip: str = "") -> None:
        self.user = user
        self.password = password
        self.service = service
        self.remote_ip = remote_ip
        self.local_ip = local_ip

    def __repr__(self) -> str:  # never the password
        return (
            f"Request(user={self.user!r}, password=<{len(self.password)} chars>, service={self.service!r}, "
            f"remote_ip={self.remote_ip!r}, local_ip={self.local_ip!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


class Reply:
    """The sidecar's answer: a status and, for OK, the extra fields for Dovecot (lower-case keys)."""

    __slots__ = ("fields", "status")

    def __init__(self, status: str, fields: "dict[str, str] | None" = None) -> None:
        self.status = status
        self.fields = dict(fields or {})

    def __repr__(self) -> str:  # never the password
        shown = {k: ("<redacted>" if k == "pass" else v) for k, v in self.fields.items()}
        return f"Reply({self.status!r}, {shown!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reply):
            return NotImplemented
        return self.status == other.status and self.fields == other.fields

    __hash__ = None  # type: ignore[assignment]


# --- framing ----------------------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    return b"%d:%b," % (len(payload), payload)


class NetstringReader:
    """Incremental netstring decoder: feed() bytes as they arrive, message() returns a payload once complete.

    Raises ProtocolError as soon as the bytes seen cannot start a valid netstring of at most max_payload bytes
    (bad length prefix, too long, missing comma), so a peer cannot make us buffer more than that.
    """

    __slots__ = ("_buf", "_length", "max_payload")

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._length = -1

    def feed(self, data: bytes) -> "bytes | None":
        """Add bytes; return the payload when the first netstring is complete (extra bytes are an error)."""
        self._buf += data
        if self._length < 0:
            colon = self._buf.find(b":")
            head = self._buf if colon < 0 else self._buf[:colon]
            if len(head) > _LEN_DIGITS or not all(c in _DIGITS for c in head):
                raise ProtocolError("bad netstring length")
            if colon < 0:
                return None
            if not head or (len(head) > 1 and head[0] == 0x30):
                raise ProtocolError("bad netstring length")
            length = int(head)
            if length > self.max_payload:
                raise ProtocolError(f"message longer than {self.max_payload} bytes")
            self._length = length
            del self._buf[: colon + 1]
        if len(self._buf) < self._length + 1:
            return None
        if len(self._buf) > self._length + 1:
            raise ProtocolError("bytes after the message")
        if self._buf[self._length] != 0x2C:
            raise ProtocolError("netstring not terminated by a comma")
        return bytes(self._buf[: self._length])

    def truncated(self) -> ProtocolError:
        """The error to raise when the peer closed before the message was complete."""
        return ProtocolError("connection closed inside a message" if self._buf or self._length >= 0 else "no message")


# --- requests ---------------------------------------------------------------------------------------------


def encode_request(req: Request) -> bytes:
    user, password, service = _raw(req.user), _raw(req.password), _raw(req.service)
    remote, local = _raw(req.remote_ip), _raw(req.local_ip)
    _check_request(user, password, service, remote, local)
    return frame(b"\0".join((MAGIC, user, password, service, remote, local)))


def _check_request(user: bytes, password: bytes, service: bytes, remote: bytes, local: bytes) -> None:
    if not user:
        raise ProtocolError("empty user")
    _check("user", user, MAX_USER)
    _check("password", password, MAX_PASSWORD, crlf=True)
    _check("service", service, MAX_SERVICE)
    _check("remote ip", remote, MAX_IP)
    _check("local ip", local, MAX_IP)


def parse_request(payload: bytes) -> Request:
    """A request payload (the netstring's content) as a Request."""
    if len(payload) > MAX_REQUEST:
        raise ProtocolError(f"request longer than {MAX_REQUEST} bytes")
    parts = payload.split(b"\0")
    if len(parts) != 6:
        raise ProtocolError(f"request has {len(parts)} fields, expected 6")
    if parts[0] != MAGIC:
        raise ProtocolError("not an AUTH1 request")
    _check_request(*parts[1:])
    user, password, service, remote, local = (_text(p) for p in parts[1:])
    return Request(user, password, service, remote, local)


def decode_request(data: bytes) -> Request:
    """A whole framed request."""
    reader = NetstringReader(MAX_REQUEST)
    payload = reader.feed(data)
    if payload is None:
        raise reader.truncated()
    return parse_request(payload)


# --- replies ----------------------------------------------------------------------------------------------


def _check_field(key: bytes, value: bytes) -> None:
    if not key or len(key) > MAX_KEY or not all(c in _KEY_CHARS for c in key):
        raise ProtocolError("bad reply field name")
    _check("reply field value", value, MAX_VALUE, crlf=key == b"pass")


def encode_reply(reply: Reply) -> bytes:
    if reply.status not in STATUSES:
        raise ProtocolError("bad reply status")
    if reply.fields and reply.status != OK:
        raise ProtocolError("only an OK reply carries fields")
    if len(reply.fields) > MAX_FIELDS:
        raise ProtocolError(f"more than {MAX_FIELDS} reply fields")
    parts = [reply.status.encode("ascii")]
    for key, value in reply.fields.items():
        k, v = _raw(key), _raw(value)
        _check_field(k, v)
        parts.append(k + b"=" + v)
    payload = b"\0".join(parts)
    if len(payload) > MAX_REPLY:
        raise ProtocolError(f"reply longer than {MAX_REPLY} bytes")
    return frame(payload)


def parse_reply(payload: bytes) -> Reply:
    if len(payload) > MAX_REPLY:
        raise ProtocolError(f"reply longer than {MAX_REPLY} bytes")
    parts = payload.split(b"\0")
    status = _text(parts[0])
    if status not in STATUSES:
        raise ProtocolError("bad reply status")
    if len(parts) > 1 and status != OK:
        raise ProtocolError("only an OK reply carries fields")
    if len(parts) - 1 > MAX_FIELDS:
        raise ProtocolError(f"more than {MAX_FIELDS} reply fields")
    fields: dict[str, str] = {}
    for part in parts[1:]:
        key, eq, value = part.partition(b"=")
        if not eq:
            raise ProtocolError("reply field without '='")
        _check_field(key, value)
        k = key.decode("ascii")
        if k in fields:
            raise ProtocolError("duplicate reply field")
        fields[k] = _text(value)
    return Reply(status, fields)


def decode_reply(data: bytes) -> Reply:
    """A whole framed reply."""
    reader = NetstringReader(MAX_REPLY)
    payload = reader.feed(data)
    if payload is None:
        raise reader.truncated()
    return parse_reply(payload)
