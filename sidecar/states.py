"""The account state machine (docs/design.md), pure logic and the one place that says where an account lives.

Every component (Dovecot auth, Postfix routing, the milter, the copier) asks this module, through the
store, where an account's mailbox is right now, so they can never disagree about a user: location(), and
the predicates on it, is_local(), is_held() and in_flight().

    (none) --mail seen--> discovered
    (none|discovered) --login, legacy says yes--> copying
    copying --initial copy done--> cutover
    cutover --final delta done--> migrated
    copying|cutover --copy keeps failing--> failed
    failed --retry--> copying
"""

from __future__ import annotations

import enum
from typing import TypeGuard


class State(enum.StrEnum):
    DISCOVERED = "discovered"
    COPYING = "copying"
    CUTOVER = "cutover"
    MIGRATED = "migrated"
    FAILED = "failed"


class Location(enum.StrEnum):
    """Which side serves an account's sessions and receives its mail."""

    LEGACY = "legacy"  # sessions proxied to the legacy server, mail relayed there
    HELD = "held"  # sessions still proxied, mail held in Postfix's queue
    LOCAL = "local"  # native Dovecot login, local delivery


class IllegalTransition(Exception):
    """A state change the state machine does not allow."""

    def __init__(self, address: str, old: State | None, new: State) -> None:
        self.address = address
        self.old = old
        self.new = new
        super().__init__(f"{address}: {old.value if old else '(none)'} -> {new.value} is not allowed")


# old state (None: no account yet) -> states it may move to
TRANSITIONS: dict[State | None, frozenset[State]] = {
    None: frozenset({State.DISCOVERED, State.COPYING}),
    State.DISCOVERED: frozenset({State.COPYING}),
    State.COPYING: frozenset({State.CUTOVER, State.FAILED}),
    State.CUTOVER: frozenset({State.MIGRATED, State.FAILED}),
    State.FAILED: frozenset({State.COPYING}),
    State.MIGRATED: frozenset(),
}


def allowed(old: State | None, new: State) -> bool:
    return new in TRANSITIONS[old]


def check_transition(address: str, old: State | None, new: State) -> None:
    """Raise IllegalTransition unless old -> new is an edge of the state machine."""
    if not allowed(old, new):
        raise IllegalTransition(address, old, new)


def location(state: State | None) -> Location:
    """Where the account's sessions and mail go in this state (unknown accounts: the legacy server)."""
    if state is State.MIGRATED:
        return Location.LOCAL
    if state is State.CUTOVER:
        return Location.HELD
    return Location.LEGACY


def is_local(state: State | None) -> TypeGuard[State]:
    """The account lives on the target: native login, local delivery (migrated)."""
    return location(state) is Location.LOCAL


def is_held(state: State | None) -> TypeGuard[State]:
    """Mail for the account waits in Postfix's queue (the final delta is running)."""
    return location(state) is Location.HELD


def in_flight(state: State | None) -> TypeGuard[State]:
    """Between the first login and the switch (copying, cutover): sessions still go to the legacy server and
    nothing but the copier writes the target mailbox."""
    return state in (State.COPYING, State.CUTOVER)
