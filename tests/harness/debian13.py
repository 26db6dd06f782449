"""The Debian 13 root (Dovecot 2.4, Postfix 3.10) for the 2.4 tests: built once per machine, or a skip that
says which step failed (no network, not root, no debootstrap)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sidecar.lab import debroot


def root_or_skip() -> Path:
    """The root (building it the first time, a few minutes), or pytest.skip naming what failed."""
    try:
        return debroot.ensure()
    except debroot.DebrootError as e:
        pytest.skip(f"Dovecot 2.4 tests need a Debian 13 root at {debroot.DEFAULT_ROOT}: {e}")
    except OSError as e:
        pytest.skip(f"Dovecot 2.4 tests need a Debian 13 root at {debroot.DEFAULT_ROOT}: {e}")


def remove_lab(d: Path) -> None:
    if not os.environ.get("AUTOPORT_KEEP_LABS"):
        shutil.rmtree(d, ignore_errors=True)
