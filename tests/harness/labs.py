"""Lab directories and running labs for tests and benchmarks.

Lab directories live under /tmp with mode 0755 (not pytest's 0700 tmp_path): Dovecot's and Postfix's
unprivileged processes must reach the sockets inside them, and UNIX socket paths must stay short.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sidecar.lab.info import LabInfo


def make_lab_dir(prefix: str = "ap-") -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(d, 0o755)
    return d


@contextlib.contextmanager
def running_lab(prefix: str = "ap-", **kw: Any) -> Iterator[LabInfo]:
    """A lab (launcher.lab_up keywords) in a fresh directory; stopped and removed afterwards
    (kept when AUTOPORT_KEEP_LABS is set, for a look at its logs)."""
    from sidecar.lab import launcher

    d = make_lab_dir(prefix)
    try:
        yield launcher.lab_up(d, **kw)
    finally:
        launcher.lab_down(d)
        if not os.environ.get("AUTOPORT_KEEP_LABS"):
            shutil.rmtree(d, ignore_errors=True)
