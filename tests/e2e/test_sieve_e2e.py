"""Sieve filters move with the mailbox: after a user with scripts migrates, the target's ManageSieve (native login)
lists the same scripts with the same one ACTIVE, byte for byte; rules that could not move are reported."""

from __future__ import annotations

import dataclasses
import imaplib
from typing import Any

import pytest
from harness.waiting import wait_state

from sidecar import config
from sidecar.legacy.managesieve import ManageSieveClient
from sidecar.migration import sieve
from sidecar.migration.copier import SourceParams
from sidecar.states import State
from sidecar.store.base import Store

pytestmark = pytest.mark.e2e


LAB = {"prefix": "ap-sieve-", "users": 2}


def scripts_on(host: str, port: int, login: str, password: str) -> dict[str, tuple[bool, bytes]]:
    """What a ManageSieve client (e.g. a webmail's filter page) sees: name -> (active, body)."""
    with ManageSieveClient(host, port, tls="none", timeout=30) as c:
        c.authenticate(login, password)
        out = {name: (active, c.getscript(name)) for name, active in c.listscripts()}
        c.logout()
    return out


def test_scripts_and_active_script_arrive_unchanged(lab: dict[str, Any], store: Store) -> None:
    lg, tg = lab["legacy"], lab["target"]
    user = lab["users"][0]  # even-numbered lab users have "filters" (active) and "vacation"
    before = scripts_on(lg["host"], lg["sieve"], user["login"], user["password"])
    assert {n: a for n, (a, _) in before.items()} == {"filters": True, "vacation": False}

    with imaplib.IMAP4(tg["host"], tg["imap"], timeout=30) as c:
        c.login(user["login"], user["password"])
    wait_state(store, user["address"], State.MIGRATED)

    after = scripts_on(tg["host"], tg["managesieve"], user["login"], user["password"])  # native login now
    assert after == before
    kinds = [e.kind for e in store.events(user["address"])]
    assert "sieve" in kinds and "sieve-failed" not in kinds


def test_user_without_scripts_migrates_without_complaint(lab: dict[str, Any], store: Store) -> None:
    tg = lab["target"]
    user = lab["users"][1]
    with imaplib.IMAP4(tg["host"], tg["imap"], timeout=30) as c:
        c.login(user["login"], user["password"])
    wait_state(store, user["address"], State.MIGRATED)
    assert scripts_on(tg["host"], tg["managesieve"], user["login"], user["password"]) == {}
    assert not [e for e in store.events(user["address"]) if e.kind.startswith("sieve")]


def test_refused_managesieve_login_is_recorded_for_the_report(lab: dict[str, Any], store: Store) -> None:
    cfg = config.load(lab["config"])
    user = lab["users"][0]
    source = SourceParams.from_config(cfg.legacy, user["login"], user["password"] + "-changed")
    # the same step the job runner takes after the initial copy, here with a password the legacy server refuses
    cfg = dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, mail_root=str(lab["dir"]) + "/scratch"))
    assert sieve.copy_for_account(cfg, store, user["address"], source) is None
    failed = [e for e in store.events(user["address"]) if e.kind == "sieve-failed"]
    assert len(failed) == 1
    assert "refused the login of " + user["login"] in failed[0].detail
    assert user["password"] not in failed[0].detail
