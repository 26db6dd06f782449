"""Wait for a condition, never for a fixed time: the one polling helper of the tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(
    check: Callable[[], Any], timeout: float = 20.0, what: str | Callable[[], str] = "condition", interval: float = 0.05
) -> Any:
    """Call check until it returns something true, and return that; AssertionError naming `what` (a text, or
    a function giving the text then, e.g. the last log lines) after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)
