"""Where Postfix sends mail for a recipient: the policy behind the socketmap (no sockets here).

More (the reasons and limits behind this module): docs/modules.md, sidecar/auth/routing.py.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re

from sidecar.config import Config
from sidecar.states import Location, State, location
from sidecar.store.base import Store, StoreUnavailable

log = logging.getLogger("autoport.routing")

MAX_KEY_BYTES = 1024  # RFC 5321 caps a path at 256 octets; leave room for odd but legal input
HOLD_REPLY = "retry:4.3.2 mailbox migration in progress"
HOLD_REASON = "mailbox migration in progress"  # what `postqueue -j` shows as delay_reason for held mail
PROBE_DOMAIN = "autoport.invalid"  # sidecar.migration.release's cache-busting probe is discarded here
PROBE_REPLY = "discard:autoport release probe"
MAPS = ("transport", "verify", "virtual")  # virtual: aliases (virtual_alias_maps), see virtual()


class Status(enum.StrEnum):
    OK = "OK"
    NOTFOUND = "NOTFOUND"
    TEMP = "TEMP"
    TIMEOUT = "TIMEOUT"
    PERM = "PERM"


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """One socketmap reply: status plus value (OK) or reason (TEMP, TIMEOUT, PERM)."""

    status: Status
    text: str = ""

    def wire(self) -> bytes:
        """The reply payload as Postfix expects it ("NOTFOUND " keeps its space), before netstring framing."""
        return f"{self.status.value} {self.text}".encode()

    @classmethod
    def ok(cls, value: str) -> Reply:
        return cls(Status.OK, value)

    @classmethod
    def temp(cls, reason: str) -> Reply:
        return cls(Status.TEMP, reason)

    @classmethod
    def perm(cls, reason: str) -> Reply:
        return cls(Status.PERM, reason)


NOTFOUND = Reply(Status.NOTFOUND)


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _has_control(s: str) -> bool:
    return _CONTROL.search(s) is not None  # a regex: 20% of a lookup's CPU as a per-character loop


class RoutingPolicy:
    """Answers socketmap lookups from the account state. Thread-safe if the store is."""

    def __init__(self, cfg: Config, store: Store, *, recipient_delimiter: str = "+") -> None:
        self.store = store
        self.lowercase = cfg.mail.lowercase
        self.domains = frozenset(d.lower() for d in cfg.mail.domains)
        self.local = cfg.target.local_transport
        self.relay = f"{cfg.target.legacy_transport}:[{cfg.legacy.host}]:{cfg.legacy.smtp_port}"
        # Postfix's recipient_delimiter (empty: extensions are not stripped); one or more delimiter characters
        self.delimiters = recipient_delimiter

    def lookup(self, map_name: str, key: str) -> Reply:
        if map_name not in MAPS:
            return Reply.perm(f"unknown map {map_name[:64]!r}")
        if not key or len(key.encode("utf-8", "surrogateescape")) > MAX_KEY_BYTES or _has_control(key):
            return Reply.perm("invalid key")
        if map_name == "virtual":
            return self.virtual(key)
        address = self._address(key)
        if address is None:
            if map_name == "transport" and key.rpartition("@")[2].lower() == PROBE_DOMAIN:
                return Reply.ok(PROBE_REPLY)
            return NOTFOUND
        try:
            where = location(self._state(address))
        except StoreUnavailable as e:
            log.warning("routing %s: store unavailable: %s", address, e)
            return Reply.temp("state store unavailable")
        if where is Location.LOCAL:
            return Reply.ok(self.local)
        if where is Location.HELD and map_name == "transport":
            return Reply.ok(HOLD_REPLY)
        return Reply.ok(self.relay)

    def _address(self, key: str) -> str | None:
        """The key as an address of one of our domains (case folded), or None."""
        local, at, domain = key.rpartition("@")
        if not at or not local or not domain:
            return None  # "*", "domain", "@domain", "user@"
        domain = domain.lower().rstrip(".")
        if domain not in self.domains:
            return None
        return f"{local.lower() if self.lowercase else local}@{domain}"

    def _state(self, address: str) -> State | None:
        """The account's state; user+ext@domain falls back to user@domain. One store read (a single SELECT)."""
        local, _, domain = address.rpartition("@")
        cut = min((i for i in (local.find(d) for d in self.delimiters) if i > 0), default=-1) if self.delimiters else -1
        if cut < 0:
            return self.store.state_of(address)
        return self.store.state_of_either(address, f"{local[:cut]}@{domain}")

    def virtual(self, key: str) -> Reply:
        """Map ``virtual`` (``virtual_alias_maps = socketmap:...:virtual``): an alias of one of our domains ->
        OK with its targets, comma separated (``user+ext@domain`` falls back to ``user@domain``; an imported
        user's extra address: OK with the account's address); NOTFOUND for every other key, so Postfix keeps
        the address; TEMP when the store cannot answer (mail is deferred)."""
        address = self._address(key)
        if address is None:
            return NOTFOUND
        try:
            targets = self.store.alias_targets(address)
            local, _, domain = address.rpartition("@")
            cut = min((i for i in (local.find(d) for d in self.delimiters) if i > 0), default=-1)
            if targets is None and cut > 0:
                targets = self.store.alias_targets(f"{local[:cut]}@{domain}")
            if targets is None:
                # an extra address of an imported user (autoport import-users) routes with its account
                owner = self.store.find_imported(address)
                if owner is not None and address in owner.addresses:
                    targets = (owner.address,)
        except StoreUnavailable as e:
            log.warning("alias %s: store unavailable: %s", address, e)
            return Reply.temp("state store unavailable")
        return Reply.ok(",".join(targets)) if targets else NOTFOUND
