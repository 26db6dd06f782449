"""Redaction at the logger: secrets never reach the log output, whichever child logger wrote them."""

from __future__ import annotations

import logging
from pathlib import Path

from sidecar.config import Config, DashboardConfig, LegacyConfig, LogConfig
from sidecar.logsetup import SECRETS, setup_logging


def test_secrets_and_pass_fields_are_redacted_in_the_file(tmp_path: Path) -> None:
    out = tmp_path / "autoport.log"
    cfg = Config(
        log=LogConfig(destination=f"file:{out}", level="debug"),
        legacy=LegacyConfig(admin_password="admin-Secret-1"),
        dashboard=DashboardConfig(token="dash-token-42"),
    )
    logger = setup_logging(cfg)
    try:
        child = logging.getLogger("sidecar.auth.deep")  # a child: logger filters alone would miss it
        with SECRETS.registered("user-pw-Ü7"):
            child.info("verifying with %s and %s", "user-pw-Ü7", "admin-Secret-1")
            child.info("reply proxy=y\tpass=whatever-it-is\thost=h")
            child.warning("legacy said: PASS sekrit-in-echo")
            try:
                raise ValueError("boom user-pw-Ü7 dash-token-42")
            except ValueError:
                child.exception("failed")
        child.info("after: user-pw-Ü7 is no longer a registered secret")
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        for f in list(logger.filters):
            logger.removeFilter(f)
        logger.propagate = True  # leave the logger as other tests expect it (caplog)
        logger.setLevel(logging.NOTSET)
    text = out.read_text(encoding="utf-8")
    for secret in ("admin-Secret-1", "dash-token-42", "whatever-it-is", "sekrit-in-echo"):
        assert secret not in text
    assert text.count("user-pw-Ü7") == 1  # only the line logged after the registration ended
    assert "verifying with <redacted> and <redacted>" in text
    assert "ValueError: boom <redacted> <redacted>" in text
    assert "pass=<redacted>" in text and "host=h" in text
