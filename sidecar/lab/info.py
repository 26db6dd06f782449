"""The lab description: what `launcher.lab_up` returns and `lab up --json` prints.

Typed dictionaries (not dataclasses) so the JSON form, lab-state.json and `info["target"]["imap"]` in tests and
benchmarks stay what they are; mypy checks the keys.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict


class LabUser(TypedDict):
    address: str
    login: str
    password: str | None  # None: an external legacy server's user listed without a password


class LegacyAdmin(TypedDict):
    user: str | None
    password: str | None


class LegacyInfo(TypedDict):
    """The legacy server: a lab one (started by lab_up) or an external one (`--legacy-external`)."""

    host: str
    imap: int | None
    pop3: int | None
    smtp: int | None
    submission: int | None
    sieve: int | None
    admin: LegacyAdmin
    external: bool
    imaps: NotRequired[int]  # the keys below: lab legacy servers only
    pop3s: NotRequired[int]
    profile: NotRequired[str]
    ca_file: NotRequired[str]
    tls_name: NotRequired[str]


class TargetInfo(TypedDict):
    """One front-end node: Postfix + Dovecot + sidecar (TargetStack.to_json plus config paths)."""

    host: str
    imap: int
    pop3: int
    smtp: int
    submission: int
    managesieve: int
    socketmap: str  # Postfix notation: unix:PATH or inet:HOST:PORT
    dashboard: int | None
    postfix_config: str
    dovecot_config: str
    mail_root: str
    config: NotRequired[str]  # second node only: its own autoport.toml and directory
    dir: NotRequired[str]


class LabInfo(TypedDict):
    dir: str
    config: str  # the (first node's) autoport.toml
    legacy: LegacyInfo
    target: TargetInfo  # nodes[0]
    nodes: list[TargetInfo]
    users: list[LabUser]
    domains: list[str]
    store: str  # store URL
    pids: dict[str, int]
    logs: str  # log directory
