"""The state store: one small interface, SQLite and PostgreSQL behind it.

Every account state change goes through Store.transition(), which checks the state machine
(sidecar.states) and applies the change atomically (compare-and-set on the old state), so two nodes
or two threads can never both move an account.

Errors: StoreUnavailable for anything that is the store's trouble (locked, down, disk full): callers
turn it into a temporary failure on their wire (checkpassword exit 111, socketmap TEMP, SMTP 4xx).
IllegalTransition (sidecar.states) for a state change the machine does not allow.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from typing import Any

from sidecar.states import State


class StoreError(Exception):
    """Base class of store errors."""


class StoreUnavailable(StoreError):
    """The store cannot answer now (down, locked, out of space): a temporary failure."""


class Conflict(StoreError):
    """The row changed under us (another node moved the account first)."""


class UnknownAccount(StoreError):
    """The operation needs an existing account and there is none with this address."""


@dataclasses.dataclass(frozen=True)
class Account:
    address: str
    state: State
    created_at: float
    updated_at: float
    has_password: bool  # a hash is stored (never the hash itself here)
    logins: tuple[str, ...] = ()
    last_login_at: float | None = None
    migrated_at: float | None = None
    messages_total: int = 0
    messages_copied: int = 0
    bytes_copied: int = 0
    attempts: int = 0
    last_error: str = ""

    def public(self) -> dict[str, Any]:
        """What `autoport status` shows: everything but secrets (there are none here)."""
        d = dataclasses.asdict(self)
        d["state"] = self.state.value
        d["logins"] = list(self.logins)
        return d


@dataclasses.dataclass(frozen=True)
class Job:
    id: int
    address: str
    kind: str  # "copy" (initial + cutover), "sweep" (trailing), ...
    status: str  # queued | leased | done | failed
    attempts: int
    not_before: float
    lease_owner: str = ""
    lease_until: float = 0.0
    last_error: str = ""


@dataclasses.dataclass(frozen=True)
class Event:
    id: int
    at: float
    address: str
    kind: str  # transition, retry, failure, sweep-hit, ...
    detail: str


@dataclasses.dataclass(frozen=True)
class MessageRecord:
    """One accepted message for one recipient, as the milter saw it."""

    queue_id: str
    recipient: str
    sender: str
    message_id: str
    route: str  # e.g. "lmtp", "smtp:[legacy]:25", "error", "retry" ({rcpt_mailer}:{rcpt_host})
    size: int
    auto_submitted: str = ""
    precedence: str = ""
    list_id: str = ""
    client_addr: str = ""
    auth_user: str = ""
    from_legacy: bool = False  # arrived from the legacy server's address
    at: float = 0.0


@dataclasses.dataclass(frozen=True)
class FolderMark:
    """Copy watermark of one legacy folder: written and durable up to last_uid under uidvalidity."""

    folder: str  # legacy folder name as the legacy server lists it
    uidvalidity: int
    last_uid: int
    messages: int = 0


@dataclasses.dataclass(frozen=True)
class Alias:
    """An address whose mail Postfix rewrites to other addresses (virtual_alias_maps)."""

    alias: str
    targets: tuple[str, ...]
    created_at: float
    updated_at: float


@dataclasses.dataclass(frozen=True)
class InventoryEntry:
    """Something the legacy server (or a directory, or a file) says exists: an account or a shared folder."""

    kind: str  # "account" (name = address) | "shared-folder" (name = legacy folder name)
    name: str
    source: str  # "legacy", "ldap", "file:/PATH"
    first_seen: float
    last_seen: float
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Exclusion:
    """An account the administrator leaves behind on purpose (`autoport exclude`): not waited for by finalize."""

    address: str
    reason: str
    created_at: float


@dataclasses.dataclass(frozen=True)
class InventoryChange:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    kept: int


KICK_KINDS = ("kick", "flush")


@dataclasses.dataclass(frozen=True)
class Kick:
    """A request to every front-end node (v4): kind "kick", close the account's proxied sessions and clear the
    route cache (the cutover); kind "flush" (v6), forget the account's logins in Dovecot's auth cache."""

    id: int
    address: str
    logins: tuple[str, ...]
    requested_at: float
    kind: str = "kick"


@dataclasses.dataclass(frozen=True)
class SweepBlock:
    """An account whose trailing sweep cannot run, and why (v4)."""

    address: str
    reason: str
    since: float


@dataclasses.dataclass(frozen=True)
class ImportedUser:
    """One row of the login map (`autoport import-users`, schema v5): the login the legacy server knows, the
    account address it belongs to, and the mailbox's extra addresses (they route with the account)."""

    login: str
    address: str
    addresses: tuple[str, ...] = ()


class Store(abc.ABC):
    """The state store. Implementations: sidecar.store.sqlite.SqliteStore, sidecar.store.postgres.PgStore."""

    # --- schema -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def init(self) -> int:
        """Create the schema (or bring it to the newest version); return the schema version."""

    @abc.abstractmethod
    def upgrade(self) -> list[int]:
        """Apply pending migrations in order; return the versions applied."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The applied schema version (0: empty store)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # --- accounts -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def get(self, address: str) -> Account | None:
        """The account with this address, or None."""

    @abc.abstractmethod
    def find_by_login(self, login: str) -> Account | None:
        """The account a login name (as typed, already normalised by the caller) belongs to."""

    @abc.abstractmethod
    def state_of(self, address: str) -> State | None:
        """The account's state, cheap (hot path of routing)."""

    def state_of_either(self, address: str, fallback: str) -> State | None:
        """The state of `address`, else of `fallback` (routing: user+ext@ falls back to user@)."""
        state = self.state_of(address)
        return state if state is not None else self.state_of(fallback)

    @abc.abstractmethod
    def transition(
        self, address: str, new: State, *, expect: State | object | None = ..., reason: str = ""
    ) -> Account:
        """Move an account to `new` through the state machine, atomically.

        Creates the account when it does not exist and (None -> new) is allowed. `expect`, when given, is the
        state the caller believes the account is in; a different actual state raises Conflict. Illegal edges
        raise IllegalTransition. Records an Event ("transition", "old -> new: reason"). Creating an account
        records its own address (lower case) as a login name. Only state, updated_at and (moving to migrated)
        migrated_at change; nothing changes when an exception is raised.
        """

    @abc.abstractmethod
    def set_password_hash(self, address: str, password_hash: str) -> None:
        """Store the Dovecot-compatible hash ("{ARGON2ID}$argon2id$...") for an existing account.

        ValueError when the {SCHEME} prefix is missing (Dovecot would take it for a plaintext password);
        UnknownAccount when there is no such account.
        """

    @abc.abstractmethod
    def add_login(self, address: str, login: str) -> None:
        """Record a login name that belongs to the account (idempotent; stored lower case).

        Conflict when the login name already belongs to another account; UnknownAccount when there is none.
        """

    @abc.abstractmethod
    def touch_login(self, address: str) -> None:
        """Record that the account logged in now."""

    @abc.abstractmethod
    def record_login(
        self, address: str, login: str, *, password_hash: str | None = None, start_copy: bool = True
    ) -> State:
        """Everything a verified login writes, in one transaction; returns the account's state afterwards.

        start_copy: create the account or move it to copying (none, discovered, failed -> copying; copying and
        cutover stay; migrated raises IllegalTransition), and queue its copy job (idempotent). Without
        start_copy the account must exist (UnknownAccount) and keeps its state. Always: record `login` (lower
        case) unless it already names another account, set last_login_at, and store password_hash when given
        (ValueError without its {SCHEME} prefix). Nothing is written when an exception is raised.
        """

    @abc.abstractmethod
    def password_hash(self, address: str) -> str | None:
        """The stored Dovecot hash (for a local check of a migrated account's unusual login spelling)."""

    @abc.abstractmethod
    def set_progress(
        self,
        address: str,
        *,
        total: int | None = None,
        copied: int | None = None,
        bytes_copied: int | None = None,
    ) -> None: ...

    @abc.abstractmethod
    def set_error(self, address: str, error: str) -> None:
        """Record the last copy error and count an attempt; an empty error clears last_error only."""

    @abc.abstractmethod
    def accounts(self, state: State | None = None) -> Iterator[Account]:
        """All accounts (or those in `state`), ordered by address."""

    @abc.abstractmethod
    def summary(self) -> dict[str, int]:
        """Number of accounts per state (every state present, zero included)."""

    # --- jobs ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def enqueue(self, address: str, kind: str = "copy", *, not_before: float = 0.0) -> Job:
        """Queue a job; idempotent: the open (queued or leased) job of this kind for the account is returned.

        UnknownAccount when there is no such account.
        """

    @abc.abstractmethod
    def wake(self, address: str, kind: str = "copy") -> bool:
        """Make the account's queued job of this kind runnable now (credentials arrived); False if none queued."""

    @abc.abstractmethod
    def lease(self, owner: str, *, kinds: tuple[str, ...] = ("copy",), seconds: float = 60.0) -> Job | None:
        """Take one runnable job (queued and due, or leased with an expired lease) for `owner`.

        Oldest not_before first; counts an attempt. None when nothing is runnable.
        """

    @abc.abstractmethod
    def renew(self, job_id: int, owner: str, *, seconds: float = 60.0) -> bool:
        """Extend a lease we hold; False when we lost it."""

    @abc.abstractmethod
    def finish(self, job_id: int, owner: str, *, error: str = "", retry_at: float | None = None) -> None:
        """Done (no error), back to queued for retry_at (error and retry_at), or failed (error, no retry_at).

        Conflict when `owner` no longer holds the lease (it expired and another owner took the job).
        """

    @abc.abstractmethod
    def jobs(self, address: str | None = None) -> list[Job]: ...

    # --- events -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def record_event(self, address: str, kind: str, detail: str = "") -> None: ...

    @abc.abstractmethod
    def events(self, address: str | None = None, limit: int = 100, *, kind: str | None = None) -> list[Event]:
        """The newest `limit` events (of one account, of one kind), newest first."""

    # --- message log (milter) -----------------------------------------------------------------------------
    @abc.abstractmethod
    def log_messages(self, records: list[MessageRecord]) -> None:
        """Append message-log rows (one transaction)."""

    @abc.abstractmethod
    def message_log(self, recipient: str | None = None, limit: int = 1000) -> list[MessageRecord]:
        """The newest `limit` rows (for one recipient), newest first; `at` 0 is stored as the time logged."""

    # --- copier watermarks --------------------------------------------------------------------------------
    @abc.abstractmethod
    def folder_marks(self, address: str) -> dict[str, FolderMark]: ...

    @abc.abstractmethod
    def set_folder_mark(self, address: str, mark: FolderMark) -> None:
        """Record a folder watermark (only after the data it covers is durable)."""

    @abc.abstractmethod
    def clear_folder_marks(self, address: str, folder: str | None = None) -> None: ...

    # --- aliases (schema v2) ------------------------------------------------------------------------------
    @abc.abstractmethod
    def set_alias(self, alias: str, targets: list[str]) -> Alias:
        """Create or replace an alias (created_at kept on replace); ValueError when targets is empty."""

    @abc.abstractmethod
    def remove_alias(self, alias: str) -> bool:
        """Delete an alias; False when there was none."""

    @abc.abstractmethod
    def alias_targets(self, alias: str) -> tuple[str, ...] | None:
        """The targets of an alias, or None (hot path of the socketmap's virtual map)."""

    @abc.abstractmethod
    def aliases(self) -> list[Alias]:
        """All aliases, ordered by alias."""

    def alias_entries(self) -> list[tuple[str, str]]:
        """What Postfix's alias map holds (sidecar.mta.aliasmap), ordered: each alias (lower case) -> its targets,
        comma separated; each extra address of an imported user that is no alias -> the account's address."""
        out = {a.alias.lower(): ", ".join(a.targets) for a in self.aliases()}
        for u in self.imported_users():
            for x in u.addresses:
                out.setdefault(x.lower(), u.address)
        return sorted(out.items())

    # --- the login map (schema v5) -------------------------------------------------------------------------
    @abc.abstractmethod
    def import_users(self, users: list[ImportedUser]) -> int:
        """Add or replace imported users (one transaction; a login's old extra addresses are replaced).

        Conflict when an address or extra address already belongs to another imported login (nothing written).
        Returns the number of users written.
        """

    @abc.abstractmethod
    def imported_users(self) -> list[ImportedUser]:
        """Every imported user, ordered by login."""

    @abc.abstractmethod
    def find_imported(self, key: str) -> ImportedUser | None:
        """The imported user whose login, address or extra address is `key` (exact), or None."""

    # --- reporting ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def message_log_since(self, since: float = 0.0) -> list[MessageRecord]:
        """Every message-log row logged at or after `since`, oldest first (for `autoport report`)."""

    # --- inventory and exclusions (schema v3) -------------------------------------------------------------
    @abc.abstractmethod
    def set_inventory(
        self, source: str, kind: str, names: dict[str, str] | list[str]
    ) -> InventoryChange:
        """Replace what `source` lists of `kind` with `names` (name -> detail, or a list): names no longer
        listed are removed, new ones added, first_seen kept for the others; one transaction."""

    @abc.abstractmethod
    def inventory(self, kind: str | None = None) -> list[InventoryEntry]:
        """Every inventory row (of one kind), ordered by kind, name, source."""

    @abc.abstractmethod
    def set_exclusion(self, address: str, reason: str) -> Exclusion:
        """Exclude an address from finalize's wait (reason replaced, created_at kept); ValueError without reason."""

    @abc.abstractmethod
    def remove_exclusion(self, address: str) -> bool:
        """Take an exclusion back; False when there was none."""

    @abc.abstractmethod
    def exclusions(self) -> list[Exclusion]:
        """All exclusions, ordered by address."""

    # --- cutover handshake and blocked sweeps (schema v4, sidecar.migration.cutover) -----------------------
    @abc.abstractmethod
    def node_heartbeat(self, node: str) -> None:
        """Record that this node (a sidecar) is alive now."""

    @abc.abstractmethod
    def live_nodes(self, within: float) -> list[str]:
        """Nodes whose heartbeat is at most `within` seconds old, sorted."""

    @abc.abstractmethod
    def request_kick(self, address: str, logins: list[str], kind: str = "kick") -> Kick:
        """Ask every node to kick the account's proxied sessions (one request per call; the address is always
        among the logins), or (kind "flush") to flush exactly these names in its auth cache (`address` then only
        says what for: an account, or a label such as "import-hashes (12 account(s))")."""

    @abc.abstractmethod
    def pending_kicks(self, node: str, since: float) -> list[Kick]:
        """Kick requests made at or after `since` that `node` has not acknowledged, oldest first."""

    @abc.abstractmethod
    def ack_kick(self, kick_id: int, node: str, detail: str = "") -> None:
        """`node` carried the request out (idempotent)."""

    @abc.abstractmethod
    def kick_acks(self, kick_id: int) -> dict[str, str]:
        """node -> detail of every acknowledgement of this request."""

    @abc.abstractmethod
    def set_sweep_block(self, address: str, reason: str) -> None:
        """The account's trailing sweep cannot run (`since` kept when already blocked)."""

    @abc.abstractmethod
    def clear_sweep_block(self, address: str) -> None: ...

    @abc.abstractmethod
    def sweep_blocks(self) -> list[SweepBlock]:
        """Every account whose sweep cannot run, ordered by address."""
