"""The lab's own settings (sidecar/lab/launcher.py): a short cutover grace where the legacy server is on loopback."""

from __future__ import annotations

from sidecar import config
from sidecar.lab import launcher


def test_lab_grace_is_short_and_production_default_is_not() -> None:
    assert launcher.with_lab_grace({})["limits"]["cutover_grace"] == launcher.LAB_CUTOVER_GRACE
    assert config.from_dict({"mail": {"domains": ["example.org"]}}).limits.cutover_grace > launcher.LAB_CUTOVER_GRACE


def test_lab_grace_keeps_what_the_caller_set() -> None:
    settings = {"limits": {"cutover_grace": 6.0, "lease_seconds": 3.0}, "target": {"smtps": True}}
    out = launcher.with_lab_grace(settings)
    assert out == settings
    out = launcher.with_lab_grace({"limits": {"lease_seconds": 3.0}})
    assert out["limits"] == {"cutover_grace": launcher.LAB_CUTOVER_GRACE, "lease_seconds": 3.0}
