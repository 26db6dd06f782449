"""Run the `autoport` command as an operator would: the installed console script, in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

AUTOPORT = str(Path(sys.executable).parent / "autoport")


def autoport(
    config: str | Path | Mapping[str, Any] | None, *args: str, stdin: str = "", timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`autoport --config CONFIG ARGS...`; CONFIG is a path, or a lab (its "config"), or None for no --config.
    The exit status is the caller's to check."""
    if isinstance(config, Mapping):
        config = config["config"]
    cmd = [AUTOPORT, *(["--config", str(config)] if config is not None else []), *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)


def write_config(tmp_path: Path, **legacy: Any) -> Path:
    """A minimal autoport.toml in tmp_path: SQLite store there, example.org/.net, legacy 192.0.2.25 (+ keys)."""
    db = tmp_path / "store" / "state.db"
    lines = [
        "[store]",
        f'url = "sqlite:///{db}"',
        "[mail]",
        'domains = ["example.org", "example.net"]',
        "[legacy]",
        'host = "192.0.2.25"',
        *(f'{k} = "{v}"' for k, v in legacy.items()),
    ]
    cfg = tmp_path / "autoport.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg
