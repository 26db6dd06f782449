"""Folder mapping: legacy folder names -> target folder names -> Maildir++ directory names. Pure, no I/O.

The target layout is fixed by the Dovecot fragments (dovecot/): `mail_location = maildir:~/Maildir`, Maildir++
layout, special-use folders Drafts, Sent, Trash, Junk, Archive. LAYOUT below is the one place holding those
parameters; change it together with the fragments. Target names here always use "/" between levels: the
namespace clients see (prefix, separator: the legacy server's by default) is only Dovecot's view of the same
Maildir++ directories (sidecar/legacy/namespace.py).
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Iterable, Mapping

from imapclient import imap_utf7

from sidecar.legacy.folder import LegacyFolder


@dataclasses.dataclass(frozen=True)
class TargetLayout:
    """How the target Dovecot lays out a mailbox (must match the dovecot/ fragments)."""

    maildir: str = "Maildir"  # mail_location = maildir:~/Maildir
    separator: str = "/"  # inbox namespace separator (what IMAP clients see)
    disk_separator: str = "."  # Maildir++: folder "a/b" lives in directory ".a.b"
    # special-use flag -> target folder name (namespace inbox { mailbox Sent { special_use = \Sent } ... })
    special: tuple[tuple[str, str], ...] = (
        ("\\Drafts", "Drafts"),
        ("\\Sent", "Sent"),
        ("\\Trash", "Trash"),
        ("\\Junk", "Junk"),
        ("\\Archive", "Archive"),
    )
    # a character the disk separator is replaced with inside one folder-name component
    disk_separator_replacement: str = "_"

    def special_folder(self, use: str) -> str | None:
        for flag, name in self.special:
            if flag.lower() == use.lower():
                return name
        return None


LAYOUT = TargetLayout()

# Common localized / vendor names of special folders (compared case-insensitively, NFC), -> special-use flag.
LOCALIZED_NAMES: dict[str, str] = {
    name.casefold(): use
    for use, names in {
        "\\Sent": (
            "Sent",
            "Sent Items",
            "Sent Messages",
            "Sent Mail",
            "Gesendet",
            "Gesendete Objekte",
            "Gesendete Elemente",
            "Envoyés",
            "Éléments envoyés",
            "Messages envoyés",
            "Enviados",
            "Elementos enviados",
            "Posta inviata",
            "Inviati",
            "Verzonden",
            "Verzonden items",
            "Skickat",
            "Wysłane",
            "Odeslaná pošta",
        ),
        "\\Drafts": (
            "Drafts",
            "Draft",
            "Entwürfe",
            "Brouillons",
            "Borradores",
            "Bozze",
            "Concepten",
            "Utkast",
            "Kopie robocze",
        ),
        "\\Trash": (
            "Trash",
            "Deleted Items",
            "Deleted Messages",
            "Deleted",
            "Papierkorb",
            "Gelöschte Objekte",
            "Gelöschte Elemente",
            "Corbeille",
            "Éléments supprimés",
            "Papelera",
            "Elementos eliminados",
            "Cestino",
            "Posta eliminata",
            "Prullenbak",
            "Verwijderde items",
            "Papperskorgen",
            "Kosz",
        ),
        "\\Junk": (
            "Junk",
            "Spam",
            "Junk E-mail",
            "Junk Email",
            "Junk Mail",
            "Bulk Mail",
            "Junk-E-Mail",
            "Spamverdacht",
            "Courrier indésirable",
            "Indésirables",
            "Correo no deseado",
            "Posta indesiderata",
            "Ongewenste e-mail",
            "Skräppost",
        ),
        "\\Archive": ("Archive", "Archives", "Archiv", "Archivo", "Archivio", "Archief", "Arkiv"),
    }.items()
    for name in names
}


class FolderError(ValueError):
    """A folder name that cannot be mapped (empty component, undecodable)."""


@dataclasses.dataclass(frozen=True)
class FolderPlan:
    legacy: str  # legacy name, decoded
    target: str  # target name, decoded, LAYOUT.separator between levels
    reason: str  # "inbox", "special-use", "localized", "override", "name", "collision"


class FolderMapper:
    """Maps legacy folder names to target names.

    `prefix` and `separator` are the legacy personal namespace (NAMESPACE; e.g. "INBOX." and "."). `overrides`
    maps legacy names (decoded) to target names (decoded, "/"-separated) and wins over everything else.
    """

    def __init__(
        self,
        separator: str | None,
        prefix: str = "",
        overrides: Mapping[str, str] | None = None,
        layout: TargetLayout = LAYOUT,
    ) -> None:
        self.separator = separator or layout.separator
        self.prefix = prefix
        self.overrides = dict(overrides or {})
        self.layout = layout

    def components(self, legacy: str) -> list[str]:
        """The hierarchy levels of a legacy name, namespace prefix removed."""
        name = legacy
        # "INBOX." matches case-insensitively (INBOX is case-insensitive), any other prefix exactly
        if (
            self.prefix
            and name.upper() != "INBOX"
            and (
                name.startswith(self.prefix)
                or (name.upper().startswith(self.prefix.upper()) and self.prefix.upper().startswith("INBOX"))
            )
        ):
            name = name[len(self.prefix) :]
        parts = name.split(self.separator) if self.separator else [name]
        if any(p == "" for p in parts):
            raise FolderError(f"folder name {legacy!r} has an empty level")
        return parts

    def plain_target(self, legacy: str) -> str:
        """The target name from the legacy name alone (no special-use or localized mapping)."""
        if legacy.upper() == "INBOX":
            return "INBOX"
        parts = self.components(legacy)
        if parts[0].upper() == "INBOX" and len(parts) == 1:
            return "INBOX"
        clean = [
            p.replace(self.layout.separator, self.layout.disk_separator_replacement).replace(
                self.layout.disk_separator, self.layout.disk_separator_replacement
            )
            for p in parts
        ]
        return self.layout.separator.join(clean)

    def special_target(self, folder: LegacyFolder) -> tuple[str, str] | None:
        """(target, reason) when the folder is one of the special folders, by flag or by a known name."""
        use = folder.special_use
        if use is not None:
            target = self.layout.special_folder(use)
            if target is not None:
                return target, "special-use"
        try:
            parts = self.components(folder.name)
        except FolderError:
            return None
        if len(parts) == 1:
            key = unicodedata.normalize("NFC", parts[0]).casefold()
            use = LOCALIZED_NAMES.get(key)
            if use is not None:
                target = self.layout.special_folder(use)
                if target is not None:
                    return target, "localized"
        return None

    def plan(self, folders: Iterable[LegacyFolder]) -> list[FolderPlan]:
        """Target names for every selectable legacy folder; no two legacy folders share a target.

        Priority for a contested target: override, then INBOX, then a special-use flag, then a localized name,
        then a folder that already has that plain name. A folder losing a special name keeps its own name; a
        remaining clash gets a numeric suffix.
        """
        items = [f for f in folders if f.selectable]
        rank = {"override": 0, "inbox": 1, "special-use": 2, "name": 3, "localized": 4}
        wanted: list[tuple[int, int, LegacyFolder, str, str]] = []
        for i, f in enumerate(items):
            if f.name in self.overrides:
                wanted.append((rank["override"], i, f, self.overrides[f.name], "override"))
                continue
            plain = self.plain_target(f.name)
            if plain == "INBOX":
                wanted.append((rank["inbox"], i, f, "INBOX", "inbox"))
                continue
            special = self.special_target(f)
            if special is not None:
                wanted.append((rank[special[1]], i, f, special[0], special[1]))
            else:
                wanted.append((rank["name"], i, f, plain, "name"))
        taken: dict[str, str] = {}
        result: dict[int, FolderPlan] = {}
        for _r, i, f, target, reason in sorted(wanted, key=lambda w: (w[0], w[1])):
            key = target.casefold() if target.upper() == "INBOX" else target
            if key in taken:
                target = self.plain_target(f.name)
                reason = "collision"
                n = 2
                base = target
                while target in taken:
                    target = f"{base}-{n}"
                    n += 1
                key = target
            taken[key] = f.name
            result[i] = FolderPlan(f.name, target, reason)
        return [result[i] for i in sorted(result)]


def to_disk(target: str, layout: TargetLayout = LAYOUT) -> str:
    """The Maildir++ directory (below the Maildir root) of a target folder: "" for INBOX, else ".A.B"."""
    if target == "INBOX":
        return ""
    parts = target.split(layout.separator)
    if any(p in ("", ".", "..") or "/" in p or "\x00" in p for p in parts):
        raise FolderError(f"target folder name {target!r} cannot be stored")
    encoded = [imap_utf7.encode(p).decode("ascii") for p in parts]
    return layout.disk_separator + layout.disk_separator.join(encoded)


def from_disk(dirname: str, layout: TargetLayout = LAYOUT) -> str:
    """Inverse of to_disk."""
    if dirname == "":
        return "INBOX"
    if not dirname.startswith(layout.disk_separator):
        raise FolderError(f"{dirname!r} is not a Maildir++ folder directory")
    parts = dirname[1:].split(layout.disk_separator)
    return layout.separator.join(imap_utf7.decode(p.encode("ascii")) for p in parts)


def subscription_line(target: str, layout: TargetLayout = LAYOUT) -> str:
    """A folder name as Dovecot 2.3's `subscriptions` file holds it.

    Verified on Dovecot 2.3.19: the file starts with "V\t2\n\n", then one name a line, each level in modified
    UTF-7 and the levels separated by TAB (e.g. "&AMQ-rger\tsub" for "Ärger/sub").
    """
    return "\t".join(imap_utf7.encode(p).decode("ascii") for p in target.split(layout.separator))


SUBSCRIPTIONS_HEADER = "V\t2\n\n"
