"""A client of Postfix's address verification service (verify(8)), as smtpd's reject_unverified_recipient asks it.

Postfix's internal protocol on private/verify: attributes as NUL-terminated `name`, `value` pairs, a lone NUL
ending a request or reply (attr_print0); the server first announces its protocol name. A query answers
the cached status and, when none is fresh, makes the service post a probe message through cleanup, exactly as
an SMTP RCPT would. Tests use it to make a probe at a moment of their choosing (the sidecar stopped).
"""

from __future__ import annotations

import socket
from pathlib import Path

PROTOCOL = "address_verification_prrotocol"  # MAIL_ATTR_PROTO_VERIFY, spelled so in Postfix's mail_proto.h
# DEL_RCPT_STAT_* (Postfix's global/deliver_request.h)
OK, DEFER, BOUNCE, TODO = 0, 1, 2, 3


def _read_attrs(f: socket.SocketIO) -> dict[str, str]:
    data = b""
    attrs: dict[str, str] = {}
    while True:
        chunk = f.read(1)
        if not chunk:
            raise ConnectionError(f"verify service closed the connection after {data!r}")
        data += chunk
        if data == b"\0":  # the end of the attribute list
            return attrs
        if data.endswith(b"\0") and data.count(b"\0") == 2:
            name, value, _ = data.split(b"\0")
            attrs[name.decode()] = value.decode("utf-8", "replace")
            data = b""


def query(queue_directory: str | Path, address: str, timeout: float = 30.0) -> tuple[int, str]:
    """(address status, text) for `address`, as the verify service answers smtpd."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(Path(queue_directory) / "private" / "verify"))
        f = socket.SocketIO(s, "rwb")
        hello = _read_attrs(f)
        if hello.get("protocol") != PROTOCOL:
            raise ConnectionError(f"not Postfix's verify service: {hello}")
        f.write(b"request\0query\0address\0" + address.encode() + b"\0\0")
        reply = _read_attrs(f)
    if reply.get("status") != "0":
        raise ConnectionError(f"verify service refused the query: {reply}")
    if "recipient_status" not in reply:
        raise ConnectionError(f"unexpected reply from the verify service: {reply}")
    return int(reply["recipient_status"]), reply.get("reason", "")
