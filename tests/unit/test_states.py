"""The account state machine (pure logic), checked against the table in DESIGN.md."""

from __future__ import annotations

import itertools

import pytest

from sidecar.states import (
    TRANSITIONS,
    IllegalTransition,
    Location,
    State,
    allowed,
    check_transition,
    in_flight,
    is_held,
    is_local,
    location,
)

# DESIGN.md "Account states", written out edge by edge
EDGES: set[tuple[State | None, State]] = {
    (None, State.DISCOVERED),  # mail seen
    (None, State.COPYING),  # login, legacy says yes
    (State.DISCOVERED, State.COPYING),  # login, or bulk migration with admin credentials
    (State.COPYING, State.CUTOVER),  # initial copy done
    (State.CUTOVER, State.MIGRATED),  # final delta done
    (State.COPYING, State.FAILED),  # copy keeps failing
    (State.CUTOVER, State.FAILED),
    (State.FAILED, State.COPYING),  # retry
}

OLD: list[State | None] = [None, *State]


@pytest.mark.parametrize(("old", "new"), list(itertools.product(OLD, State)), ids=str)
def test_every_pair_is_allowed_exactly_when_it_is_an_edge(old: State | None, new: State) -> None:
    expected = (old, new) in EDGES
    assert allowed(old, new) is expected
    if expected:
        check_transition("a@example.org", old, new)
    else:
        with pytest.raises(IllegalTransition) as info:
            check_transition("a@example.org", old, new)
        assert (info.value.address, info.value.old, info.value.new) == ("a@example.org", old, new)


def test_table_covers_every_state_and_nothing_more() -> None:
    assert set(TRANSITIONS) == set(OLD)
    assert {(o, n) for o, targets in TRANSITIONS.items() for n in targets} == EDGES


def test_migrated_is_final_and_nothing_loops_on_itself() -> None:
    assert TRANSITIONS[State.MIGRATED] == frozenset()
    assert not any(allowed(s, s) for s in State)


def test_every_state_is_reachable_and_every_live_state_can_reach_migrated() -> None:
    reach: set[State | None] = {None}
    frontier: list[State | None] = [None]
    while frontier:
        for n in TRANSITIONS[frontier.pop()]:
            if n not in reach:
                reach.add(n)
                frontier.append(n)
    assert reach == set(OLD)

    def reaches_migrated(s: State | None, seen: frozenset[State | None] = frozenset()) -> bool:
        return s is State.MIGRATED or any(
            reaches_migrated(n, seen | {s}) for n in TRANSITIONS[s] if n not in seen
        )

    assert all(reaches_migrated(s) for s in OLD)


def test_illegal_transition_message_names_the_account_and_the_edge() -> None:
    e = IllegalTransition("bob@example.org", None, State.MIGRATED)
    assert str(e) == "bob@example.org: (none) -> migrated is not allowed"
    e = IllegalTransition("bob@example.org", State.MIGRATED, State.COPYING)
    assert str(e) == "bob@example.org: migrated -> copying is not allowed"


@pytest.mark.parametrize(
    ("state", "where"),
    [
        (None, Location.LEGACY),
        (State.DISCOVERED, Location.LEGACY),
        (State.COPYING, Location.LEGACY),
        (State.FAILED, Location.LEGACY),  # a failed copy leaves the user on the legacy server
        (State.CUTOVER, Location.HELD),
        (State.MIGRATED, Location.LOCAL),
    ],
)
def test_location_of_each_state(state: State | None, where: Location) -> None:
    assert location(state) is where


def test_states_compare_as_their_stored_strings() -> None:
    assert [s.value for s in State] == ["discovered", "copying", "cutover", "migrated", "failed"]
    assert State("migrated") is State.MIGRATED and State.MIGRATED == "migrated"


@pytest.mark.parametrize("state", [None, *State])
def test_predicates_agree_with_location(state: State | None) -> None:
    where = location(state)
    assert is_local(state) is (where is Location.LOCAL)
    assert is_held(state) is (where is Location.HELD)
    assert in_flight(state) is (state in (State.COPYING, State.CUTOVER))
    if in_flight(state):  # the copier owns the mailbox: never local yet
        assert where is not Location.LOCAL
