"""Wait for a condition, never for a fixed time: the one polling helper of the tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sidecar.states import State
from sidecar.store.base import Store


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


def wait_state(
    store: Store, address: str, want: State, timeout: float = 90.0, *, fail_fast: bool = True, interval: float = 0.1
) -> list[str]:
    """Wait until the account is in state `want`; the states seen on the way ("(none)" before it exists).
    With fail_fast, an account that ends up failed instead raises AssertionError at once (with its last error)."""
    seen: list[str] = []

    def reached() -> bool:
        account = store.get(address)
        state = account.state.value if account else "(none)"
        if not seen or seen[-1] != state:
            seen.append(state)
        if fail_fast and account is not None and account.state is State.FAILED and want is not State.FAILED:
            raise AssertionError(f"{address} failed instead of reaching {want.value}: {account.last_error} ({seen})")
        return account is not None and account.state is want

    wait_for(reached, timeout, lambda: f"{address} to reach {want.value} ({seen})", interval)
    return seen
