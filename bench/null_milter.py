"""A do-nothing milter for bench/smtp_bench.py: pymilter, its own process, the protocol the sidecar's milter
negotiates (no HELO/DATA/unknown/end-of-header events; no reply to MAIL, RCPT, headers, body), and no work at
all in its callbacks. What is left is what libmilter and pymilter themselves cost Postfix per message.

    .venv/bin/python bench/null_milter.py unix:/PATH
"""

from __future__ import annotations

import sys

import Milter


class NullMilter(Milter.Base):  # type: ignore[misc]
    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        return int(Milter.CONTINUE)

    @Milter.noreply  # type: ignore[misc]
    def envfrom(self, mailfrom: str, *params: str) -> int:
        return int(Milter.CONTINUE)

    @Milter.noreply  # type: ignore[misc]
    def envrcpt(self, to: str, *params: str) -> int:
        return int(Milter.CONTINUE)

    @Milter.noreply  # type: ignore[misc]
    def header(self, field: str, value: str) -> int:
        return int(Milter.CONTINUE)

    @Milter.noreply  # type: ignore[misc]
    def body(self, chunk: bytes) -> int:
        return int(Milter.CONTINUE)

    def eom(self) -> int:
        return int(Milter.ACCEPT)


def main() -> None:
    Milter.factory = NullMilter
    Milter.runmilter("null", sys.argv[1], 30)


if __name__ == "__main__":
    main()
