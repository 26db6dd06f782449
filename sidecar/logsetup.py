"""Logging for the sidecar, with redaction at the logger: no call site has to remember it.

setup_logging(cfg) configures the "sidecar" logger (and so every "sidecar.*" child) to write to
log.destination, and installs one RedactingFilter on the logger *and on its handlers*: a logger's own
filters do not see records that propagate from child loggers, handler filters do.

The filter removes from every record (message, arguments, exception text, stack):
  - every registered secret: the config's secrets at setup, and in-flight passwords while a check runs
    (`with SECRETS.registered(password): ...`);
  - `pass=...`, `password=...` and `PASS ...`-style fields (Dovecot extra fields, POP3 command echoes).
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import re
import sys
import threading
from collections import Counter
from collections.abc import Iterator

from sidecar.config import Config, secrets

REDACTED = "<redacted>"
LOGGER_NAME = "sidecar"
# every logger of the package lives under one of these ("autoport.daemon", "autoport.socketmap", ...)
LOGGER_NAMES = (LOGGER_NAME, "autoport")
# pass=x, password: x, "PASS x" (the POP3 command); not "pass through"
_PATTERN = re.compile(r"\b((?i:pass(?:word)?)[=:]\s*|PASS\s+)(\"[^\"]*\"|[^\s,;]+)")
_MIN_SECRET = 3  # shorter strings would redact half the log; such passwords are refused anyway


class SecretRegistry:
    """Strings that must never appear in a log record. Thread-safe; counted so nested registrations work."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: Counter[str] = Counter()
        self._sorted: tuple[str, ...] = ()

    def add(self, secret: str) -> None:
        if len(secret) < _MIN_SECRET:
            return
        with self._lock:
            self._secrets[secret] += 1
            self._sorted = tuple(sorted(self._secrets, key=len, reverse=True))

    def discard(self, secret: str) -> None:
        with self._lock:
            if self._secrets.get(secret, 0) > 1:
                self._secrets[secret] -= 1
            else:
                self._secrets.pop(secret, None)
            self._sorted = tuple(sorted(self._secrets, key=len, reverse=True))

    @contextlib.contextmanager
    def registered(self, secret: str) -> Iterator[None]:
        self.add(secret)
        try:
            yield
        finally:
            self.discard(secret)

    def redact(self, text: str) -> str:
        for secret in self._sorted:  # longest first, so a secret containing another is removed whole
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _PATTERN.sub(lambda m: f"{m.group(1)}{REDACTED}", text)


SECRETS = SecretRegistry()


class RedactingFilter(logging.Filter):
    """Rewrites each record with secrets removed; never drops a record."""

    def __init__(self, registry: SecretRegistry = SECRETS) -> None:
        super().__init__()
        self.registry = registry
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_autoport_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep what we can, redacted
            message = f"{record.msg!s} {record.args!r}"
        # one record, one line: CR/LF that a peer smuggled into a logged value (a login name, a map key)
        # must not start a line that looks like a record of its own (tracebacks keep their lines)
        record.msg = self.registry.redact(message).replace("\r", "\\r").replace("\n", "\\n")
        record.args = None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self._formatter.formatException(record.exc_info)
            record.exc_info = None  # formatters would re-render the unredacted traceback otherwise
        if record.exc_text:
            record.exc_text = self.registry.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.registry.redact(record.stack_info)
        record._autoport_redacted = True
        return True


def _handler(destination: str) -> logging.Handler:
    if destination == "stderr":
        return logging.StreamHandler(sys.stderr)
    if destination == "syslog":
        handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
        return handler
    if destination.startswith("file:"):
        return logging.FileHandler(destination[len("file:") :], encoding="utf-8")
    raise ValueError(f"unknown log destination {destination!r}")


def install_filter(logger: logging.Logger, registry: SecretRegistry = SECRETS) -> RedactingFilter:
    """Put a RedactingFilter on logger and all its handlers (idempotent)."""
    existing = next((f for f in logger.filters if isinstance(f, RedactingFilter)), None)
    flt = existing or RedactingFilter(registry)
    if existing is None:
        logger.addFilter(flt)
    for h in logger.handlers:
        if flt not in h.filters:
            h.addFilter(flt)
    return flt


def setup_logging(cfg: Config) -> logging.Logger:
    """Configure the "sidecar" (and "autoport") loggers from cfg.log and register the config's secrets."""
    handler = _handler(cfg.log.destination)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if cfg.log.destination == "syslog":
        fmt = "autoport[%(process)d]: %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    for secret in secrets(cfg):
        SECRETS.add(secret)
    for name in LOGGER_NAMES:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
            if h is not handler:
                h.close()
        logger.addHandler(handler)
        logger.setLevel(cfg.log.level.upper())
        logger.propagate = False
        install_filter(logger)
    return logging.getLogger(LOGGER_NAME)
