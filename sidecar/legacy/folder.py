"""A folder as the legacy server lists it (LIST): name, delimiter, flags; its special use (RFC 6154)."""

from __future__ import annotations

import dataclasses

SPECIAL_USES = ("\\Drafts", "\\Sent", "\\Trash", "\\Junk", "\\Archive")


@dataclasses.dataclass(frozen=True)
class LegacyFolder:
    """A folder as the legacy server lists it: decoded name (unicode), its delimiter and LIST flags."""

    name: str
    delimiter: str | None
    flags: tuple[str, ...] = ()

    @property
    def selectable(self) -> bool:
        lowered = {f.lower() for f in self.flags}
        return "\\noselect" not in lowered and "\\nonexistent" not in lowered

    @property
    def special_use(self) -> str | None:
        for f in self.flags:
            for use in SPECIAL_USES:
                if f.lower() == use.lower():
                    return use
        return None
