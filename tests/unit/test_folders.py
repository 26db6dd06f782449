"""Folder mapping: legacy names -> target names -> Maildir++ directories (pure, table-driven)."""

from __future__ import annotations

import pytest

from sidecar.migration.copier.folders import (
    FolderError,
    FolderMapper,
    LegacyFolder,
    from_disk,
    subscription_line,
    to_disk,
)

# (legacy separator, prefix, legacy name, LIST flags) -> target name
SINGLE = [
    ("/", "", "INBOX", (), "INBOX"),
    (".", "INBOX.", "INBOX", (), "INBOX"),
    (".", "INBOX.", "INBOX.Projekte.2024", (), "Projekte/2024"),
    ("/", "", "Projekte/2024", (), "Projekte/2024"),
    (".", "INBOX.", "INBOX.Sent Items", (), "Sent"),
    ("/", "", "Gesendete Objekte", (), "Sent"),
    ("/", "", "Papierkorb", (), "Trash"),
    ("/", "", "Deleted Items", (), "Trash"),
    ("/", "", "Junk E-mail", (), "Junk"),
    ("/", "", "Spam", (), "Junk"),
    ("/", "", "Entwürfe", (), "Drafts"),
    ("/", "", "Whatever", ("\\Sent",), "Sent"),
    ("/", "", "Old/Archive", ("\\Archive",), "Archive"),
    ("/", "", "Kunden/Sent Items", (), "Kunden/Sent Items"),  # only top-level names are localized names
    ("/", "", "Mr. Smith", (), "Mr_ Smith"),  # "." cannot live in a Maildir++ name component
    ("\\", "", "A\\B", (), "A/B"),
]


@pytest.mark.parametrize(("sep", "prefix", "name", "flags", "target"), SINGLE)
def test_single_folder(sep: str, prefix: str, name: str, flags: tuple[str, ...], target: str) -> None:
    plan = FolderMapper(sep, prefix).plan([LegacyFolder(name, sep, flags)])
    assert [p.target for p in plan] == [target]


def test_collisions_special_use_wins_and_others_keep_their_names() -> None:
    folders = [
        LegacyFolder("Sent", "/"),
        LegacyFolder("Sent Items", "/", ("\\Sent",)),
        LegacyFolder("Gesendet", "/"),
        LegacyFolder("Trash", "/"),
        LegacyFolder("Deleted Items", "/"),
        LegacyFolder("Parent", "/", ("\\Noselect",)),
    ]
    plan = {p.legacy: p.target for p in FolderMapper("/").plan(folders)}
    assert plan == {
        "Sent Items": "Sent",
        "Sent": "Sent-2",
        "Gesendet": "Gesendet",
        "Trash": "Trash",
        "Deleted Items": "Deleted Items",
    }
    assert len(set(plan.values())) == len(plan)


def test_overrides_win() -> None:
    folders = [LegacyFolder("Sent Items", "/"), LegacyFolder("Alt", "/")]
    plan = {p.legacy: p.target for p in FolderMapper("/", overrides={"Alt": "Sent"}).plan(folders)}
    assert plan == {"Alt": "Sent", "Sent Items": "Sent Items"}


@pytest.mark.parametrize(
    ("target", "disk"),
    [
        ("INBOX", ""),
        ("Sent", ".Sent"),
        ("Projekte/Ärger & Co", ".Projekte.&AMQ-rger &- Co"),
        ("日本語/x", ".&ZeVnLIqe-.x"),
    ],
)
def test_disk_names_round_trip(target: str, disk: str) -> None:
    assert to_disk(target) == disk
    assert from_disk(disk) == target


@pytest.mark.parametrize("bad", ["a//b", "../x", "a/./b"])
def test_unstorable_names_rejected(bad: str) -> None:
    with pytest.raises(FolderError):
        to_disk(bad)


def test_subscription_line_matches_dovecot() -> None:
    # as Dovecot 2.3.19 wrote it after SUBSCRIBE "&AMQ-rger/sub"
    assert subscription_line("Ärger/sub") == "&AMQ-rger\tsub"
