"""The target offers what the legacy server offered: the lab's legacy Postfix announces SIZE 26214400 (above
Postfix's default) and SMTP AUTH with implicit TLS on its smtps port, no AUTH on port 25; `lab up` asks it as
`autoport doctor` does and renders the target's Postfix accordingly. A user of the legacy server then sends with
SMTP AUTH over implicit TLS to the target (their legacy password, checked on the legacy server), and the target's
port 25 announces the same SIZE and, like the legacy one, no AUTH.
"""

from __future__ import annotations

import dataclasses
import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest

from sidecar import config
from sidecar.lab import legacy as legacy_mod
from sidecar.lab import target as target_mod
from sidecar.ops import doctor

pytestmark = pytest.mark.e2e


LAB = {"prefix": "ap-offer-", "users": 1}


def _ehlo(host: str, port: int) -> dict[str, str]:
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.ehlo("client.test")
        return dict(s.esmtp_features)


def test_size_and_auth_on_25_as_legacy(lab: dict[str, Any]) -> None:
    lg, tg = lab["legacy"], lab["target"]
    legacy_features = _ehlo(lg["host"], lg["smtp"])
    target_features = _ehlo(tg["host"], tg["smtp"])
    assert legacy_features["size"].strip() == str(legacy_mod.MESSAGE_SIZE_LIMIT)
    assert target_features["size"].strip() == legacy_features["size"].strip()
    assert "auth" not in legacy_features and "auth" not in target_features


def test_smtp_auth_with_implicit_tls_on_the_target(lab: dict[str, Any]) -> None:
    tg = lab["target"]
    user = lab["users"][0]
    assert tg["smtps"]
    stack = target_mod.load_target(Path(lab["dir"]))
    assert stack is not None
    ctx = ssl.create_default_context(cafile=str(stack.ca_file))
    # the lab certificate names the target's address too
    with smtplib.SMTP_SSL(tg["host"], tg["smtps"], context=ctx, timeout=30) as s:
        s.ehlo("client.test")
        assert "PLAIN" in s.esmtp_features["auth"].upper().split()
        code, _ = s.login(user["login"], user["password"])
        assert code == 235


def test_doctor_compares_the_offer(lab: dict[str, Any]) -> None:
    cfg = config.load(lab["config"])
    assert [f.status for f in doctor.check_offer(cfg)] == [doctor.OK]
    less = dataclasses.replace(
        cfg, target=dataclasses.replace(cfg.target, smtps=False, message_size_limit=10240000)
    )
    bad = list(doctor.check_offer(less))
    assert [f.status for f in bad] == [doctor.PROBLEM]
    assert "smtps = true" in bad[0].fix and f"message_size_limit = {legacy_mod.MESSAGE_SIZE_LIMIT}" in bad[0].fix
