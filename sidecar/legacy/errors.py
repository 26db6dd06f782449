"""The one error family for talking to the legacy server: typed errors, temporary where the cause is ours.

    LegacyError
      LegacyAuthFailed      a definite "no" to the credentials (permanent for this login)
      LegacyUnavailable     no answer could be had: unreachable, timeout, TLS, BYE, 4xx (temporary)
        LegacyProtocolError a reply we cannot understand (temporary: the pass stops, the caller retries)

Each client keeps its own names, as subclasses: legacy.verify.LegacyAuthError (protocol, reason),
legacy.imap.Source*Error, legacy.managesieve.Sieve*Error. `except LegacyUnavailable` catches all three kinds.
"""

from __future__ import annotations


class LegacyError(Exception):
    """Something went wrong between us and the legacy server."""


class LegacyAuthFailed(LegacyError):
    """The legacy server (or our own pre-check) definitely refused the credentials."""


class LegacyUnavailable(LegacyError):
    """No answer could be had from the legacy server: a temporary failure.

    `spent` is true when the credentials may already have reached the server (a timeout inside the
    session): the legacy server likely counted an attempt, so verify() tries no other protocol (each would
    cost it one more, and a legacy server that slows down after wrong passwords slows down further).
    """

    def __init__(self, message: str, *, spent: bool = False) -> None:
        super().__init__(message)
        self.spent = spent


class LegacyProtocolError(LegacyUnavailable):
    """The legacy server sent something that is not the protocol as we know it."""
