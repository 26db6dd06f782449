"""legacy/errors: every client's errors are one family, so callers can catch by meaning."""

from __future__ import annotations

import pytest

from sidecar.legacy import errors, verify
from sidecar.legacy.imap import SourceAuthError, SourceError, SourceProtocolError, SourceUnavailable
from sidecar.legacy.managesieve import (
    SieveAuthError,
    SieveError,
    SieveProtocolError,
    SieveScriptError,
    SieveUnavailable,
)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (verify.LegacyAuthError("imap", "no"), errors.LegacyAuthFailed),
        (verify.LegacyUnavailable("down"), errors.LegacyUnavailable),
        (SourceAuthError("no"), errors.LegacyAuthFailed),
        (SourceUnavailable("down"), errors.LegacyUnavailable),
        (SourceProtocolError("bad literal"), errors.LegacyProtocolError),
        (SieveAuthError("no"), errors.LegacyAuthFailed),
        (SieveUnavailable("down"), errors.LegacyUnavailable),
        (SieveProtocolError("bad reply"), errors.LegacyProtocolError),
    ],
)
def test_each_client_error_is_of_the_family(error: Exception, kind: type[Exception]) -> None:
    assert isinstance(error, kind) and isinstance(error, errors.LegacyError)


def test_the_old_names_and_their_bases_still_hold() -> None:
    assert issubclass(SourceProtocolError, SourceUnavailable) and issubclass(SourceUnavailable, SourceError)
    assert issubclass(SieveProtocolError, SieveUnavailable) and issubclass(SieveScriptError, SieveError)
    assert not issubclass(SieveScriptError, errors.LegacyUnavailable)  # one script: not a server outage
    assert verify.LegacyUnavailable is errors.LegacyUnavailable
    e = verify.LegacyAuthError("pop3", "wrong password")
    assert (str(e), e.protocol, e.reason) == ("pop3: wrong password", "pop3", "wrong password")
    assert SourceUnavailable("x").spent is False and verify.LegacyUnavailable("x", spent=True).spent


def test_tls_context_is_still_importable_from_verify() -> None:
    from sidecar.legacy import tls

    assert verify.tls_context is tls.tls_context
