"""Message-log rows for report and ops tests: a recipient, a route, how long ago."""

from __future__ import annotations

import time
from typing import Any

from sidecar.store.base import MessageRecord

NOW = time.time()
DAY = 86400.0
LEGACY = "legacy:[192.0.2.25]:25"
HASH = "{SHA512-CRYPT}$6$abc$def"  # a password hash for accounts in report and readiness tests
LOCAL = "lmtp:private/dovecot-lmtp"


def row(rcpt: str, route: str, *, ago: float, size: int = 1000, **kw: Any) -> MessageRecord:
    return MessageRecord(
        queue_id="Q" + rcpt[:3], recipient=rcpt, sender=kw.pop("sender", "someone@outside.test"),
        message_id="<m@x>", route=route, size=size, at=NOW - ago, **kw,
    )  # fmt: skip
