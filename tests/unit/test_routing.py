"""Routing policy: every account state -> the answer Postfix gets, for both maps (fake store: pure logic)."""

from __future__ import annotations

from typing import cast

import pytest
from harness.fakes import FakeStore

from sidecar.auth.routing import NOTFOUND, Reply, RoutingPolicy, Status
from sidecar.config import Config
from sidecar.states import State
from sidecar.store.base import Store

LMTP = "lmtp:unix:private/dovecot-lmtp"
RELAY = "legacy:[192.0.2.25]:2525"
HOLD = "retry:4.3.2 mailbox migration in progress"


def make_cfg(**mail: object) -> Config:
    cfg = Config()
    cfg.mail.domains = ["example.org", "example.net"]
    cfg.legacy.host = "192.0.2.25"
    cfg.legacy.smtp_port = 2525
    for k, v in mail.items():
        setattr(cfg.mail, k, v)
    return cfg


def policy(states: dict[str, State] | None = None, **kw: object) -> tuple[RoutingPolicy, FakeStore]:
    store = FakeStore(states, down=bool(kw.pop("down", False)))
    return RoutingPolicy(make_cfg(**kw), cast(Store, store)), store


@pytest.mark.parametrize(
    ("state", "transport", "verify"),
    [
        (None, RELAY, RELAY),
        (State.DISCOVERED, RELAY, RELAY),
        (State.COPYING, RELAY, RELAY),
        (State.FAILED, RELAY, RELAY),
        (State.CUTOVER, HOLD, RELAY),  # mail held; recipient probes still ask the legacy server
        (State.MIGRATED, LMTP, LMTP),
    ],
)
def test_every_state(state: State | None, transport: str, verify: str) -> None:
    p, _ = policy({"ann@example.org": state} if state else {})
    assert p.lookup("transport", "ann@example.org") == Reply(Status.OK, transport)
    assert p.lookup("verify", "ann@example.org") == Reply(Status.OK, verify)


def test_wire_format() -> None:
    p, _ = policy({"ann@example.org": State.CUTOVER})
    assert p.lookup("transport", "ann@example.org").wire() == b"OK " + HOLD.encode()
    assert p.lookup("transport", "x@elsewhere.test").wire() == b"NOTFOUND "


@pytest.mark.parametrize(
    "key",
    ["x@elsewhere.test", "x@sub.example.org", "*", "example.org", "@example.org", "ann@", "plain"],
)
def test_not_ours_or_not_an_address_is_notfound(key: str) -> None:
    p, store = policy({"ann@example.org": State.MIGRATED})
    assert p.lookup("transport", key) == NOTFOUND
    assert p.lookup("verify", key) == NOTFOUND
    assert store.asked == []  # no store read for keys that are not ours


def test_store_down_is_temp() -> None:
    p, _ = policy(down=True)
    for map_name in ("transport", "verify"):
        reply = p.lookup(map_name, "ann@example.org")
        assert reply.status is Status.TEMP
        assert reply.wire().startswith(b"TEMP ")
    assert p.lookup("transport", "x@elsewhere.test") == NOTFOUND  # other domains need no store


def test_case_folded_when_lowercase() -> None:
    p, store = policy({"ann@example.org": State.MIGRATED})
    assert p.lookup("transport", "Ann@EXAMPLE.Org") == Reply.ok(LMTP)
    assert store.asked == ["ann@example.org"]


def test_local_part_kept_when_not_lowercase() -> None:
    p, _store = policy({"Ann@example.org": State.MIGRATED}, lowercase=False)
    assert p.lookup("transport", "Ann@EXAMPLE.org") == Reply.ok(LMTP)
    assert p.lookup("transport", "ann@example.org") == Reply.ok(RELAY)


def test_address_extension_routes_like_the_account() -> None:
    p, _store = policy({"ann@example.org": State.MIGRATED, "bob@example.org": State.CUTOVER})
    assert p.lookup("transport", "ann+lists@example.org") == Reply.ok(LMTP)
    assert p.lookup("transport", "bob+x+y@example.org") == Reply.ok(HOLD)
    assert p.lookup("transport", "+x@example.org") == Reply.ok(RELAY)  # no base local part: unknown


def test_extension_account_of_its_own_wins() -> None:
    p, _ = policy({"ann@example.org": State.MIGRATED, "ann+shop@example.org": State.COPYING})
    assert p.lookup("transport", "ann+shop@example.org") == Reply.ok(RELAY)


def test_no_delimiter_no_stripping() -> None:
    store = FakeStore({"ann@example.org": State.MIGRATED})
    p = RoutingPolicy(make_cfg(), cast(Store, store), recipient_delimiter="")
    assert p.lookup("transport", "ann+x@example.org") == Reply.ok(RELAY)


@pytest.mark.parametrize("key", ["ann\r\n@example.org", "ann\x00@example.org", "a\x7f@example.org", ""])
def test_control_characters_and_empty_refused(key: str) -> None:
    p, store = policy({"ann@example.org": State.MIGRATED})
    assert p.lookup("transport", key).status is Status.PERM
    assert store.asked == []


def test_oversize_key_refused() -> None:
    p, store = policy()
    assert p.lookup("transport", "a" * 2000 + "@example.org").status is Status.PERM
    assert store.asked == []


def test_unknown_map_is_perm() -> None:
    p, _ = policy({"ann@example.org": State.MIGRATED})
    reply = p.lookup("aliases", "ann@example.org")
    assert reply.status is Status.PERM
    assert "aliases" in reply.text


def test_lookup_never_writes() -> None:
    p, store = policy()
    p.lookup("transport", "new@example.org")
    assert store.states == {}
