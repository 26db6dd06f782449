"""The alias map Postfix reads (virtual_alias_maps): a file map generated from the state store.

    aliases = AliasMap.from_postfix(cfg)      # what main.cf's virtual_alias_maps names, if it is ours
    aliases.sync(store)                       # rewrite it when the store's aliases changed

The aliases (`autoport alias`) and the extra addresses of imported users (`autoport import-users`) used to be
answered by the sidecar's socketmap. cleanup(8) asks virtual_alias_maps for every message, Postfix's own address
verification probes included, and a probe cleanup refuses is lost without a trace: the verify service then
answers "Address verification in progress" (450) for that address until its probe is 1000 s old (PROBE_TTL,
compiled into verify.c) and sends no new one. A sidecar restart under load did exactly that (seen in
tests/e2e/test_conservation.py: 6+ minutes of 450 for one address). A file map needs no sidecar: cleanup always
accepts, and a routing lookup that fails later (the socketmap's transport map in qmgr) defers the probe, which the
verify service records and probes again after address_verify_negative_refresh_time.

Every node's sidecar writes its own map from the shared store (Keeper, every 5 s when it differs), and the CLI
writes it at once after a change, so `autoport alias add` is in effect when it returns. The map is replaced, never
edited in place: the text and the indexed file are built in a temporary directory beside it and renamed over the
old ones (the indexed file first, so Postfix never sees an index older than its source). Postfix's daemons notice
the replaced file (its link count drops to 0) and restart before their next request.

A map whose source file exists without this module's header line is the administrator's: it is never written.

More (the reasons and limits behind this module): docs/modules.md, sidecar/mta/aliasmap.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.config import Config
from sidecar.mta import commands

if TYPE_CHECKING:
    from sidecar.store.base import Store

log = logging.getLogger("autoport.aliasmap")

HEADER = "# autoport: generated from the state store (`autoport alias`, `autoport import-users`); do not edit\n"
# indexed map types postmap builds, and the file it builds beside the source; texthash is read as it is
INDEXED = {"hash": ".db", "btree": ".db", "lmdb": ".lmdb", "cdb": ".cdb"}
TYPES = (*INDEXED, "texthash")
# The default map's directory: the sidecar's user owns it, Postfix reads it. Not inside Postfix's config directory
# (`postfix check` warns about every file there not owned by root) nor the state directory (Dovecot's group only).
DIRECTORY = "/var/lib/autoport-postfix"
NAME = "aliases"


class AliasMapError(Exception):
    """The map could not be written (the message names the file and the cause)."""


def default_spec(db_type: str, directory: str = DIRECTORY) -> str:
    return f"{db_type}:{directory}/{NAME}"


def _bad(text: str) -> bool:
    return not text or any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in text)


def map_text(entries: Iterable[tuple[str, str]]) -> tuple[str, list[str]]:
    """The map's source text (header, then `key<TAB>targets` lines), and the keys left out (not writable)."""
    lines, skipped = [HEADER], []
    for key, value in entries:
        if _bad(key) or any(c in value for c in "\r\n\x00"):
            skipped.append(key)
            continue
        lines.append(f"{key}\t{value}\n")
    return "".join(lines), skipped


def store_text(store: Store) -> tuple[str, list[str]]:
    return map_text(store.alias_entries())


class AliasMap:
    """One Postfix map file (TYPE:PATH) written from the store."""

    def __init__(self, spec: str, postfix_config: str = "") -> None:
        db_type, sep, path = spec.partition(":")
        if not sep or db_type not in TYPES or not path.startswith("/"):
            raise AliasMapError(f"{spec!r} is not a map autoport can write (one of {', '.join(TYPES)}, absolute path)")
        self.spec = spec
        self.type = db_type
        self.path = Path(path)
        self.postfix_config = postfix_config
        self.written = ""  # the text last written (or found) by this object

    @classmethod
    def from_postfix(cls, cfg: Config) -> AliasMap | None:
        """The map main.cf's virtual_alias_maps names when it is one of ours; None (logged) otherwise."""
        pf = cfg.target.postfix_config
        try:
            value = commands.postconf(pf, "-h", "virtual_alias_maps", timeout=30).out.strip()
        except (OSError, commands.CommandNotRun, commands.CommandFailed) as e:
            log.warning("cannot ask Postfix for virtual_alias_maps (%s): the alias map is not kept", e)
            return None
        for spec in value.replace(",", " ").split():
            if spec.partition(":")[0] not in TYPES:
                continue
            try:
                amap = cls(spec, pf)
            except AliasMapError:
                continue
            if amap.ours():
                return amap
            log.warning("virtual_alias_maps %s is not autoport's (no header line): not written", spec)
        return None

    def ours(self) -> bool:
        """True when the source file is missing or starts with HEADER."""
        try:
            with self.path.open(encoding="utf-8", errors="replace") as f:
                return f.readline() == HEADER
        except FileNotFoundError:
            return True
        except OSError:
            return False

    def current(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return ""

    def sync(self, store: Store) -> bool:
        """Write the map when the store's entries differ from it; True when it was written."""
        text, skipped = store_text(store)
        if not self.written:
            self.written = self.current()
        if text == self.written:
            return False
        if skipped:
            log.warning("alias map %s: left out %d address(es) Postfix cannot read: %s", self.path, len(skipped),
                        ", ".join(repr(k) for k in skipped[:10]))  # fmt: skip
        self.write(text)
        return True

    def write(self, text: str) -> None:
        """Replace the map with `text` (built beside it, renamed into place; one writer at a time)."""
        d, name = self.path.parent, self.path.name
        try:
            d.mkdir(parents=True, exist_ok=True)
            # the lock file is opened read-only: a CLI run as root and the daemon as its own user share it
            lock = os.open(d / f".{name}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as e:
            raise AliasMapError(f"{d}: {e.strerror or e}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=d))
            try:
                src = tmp / name
                src.write_text(text, encoding="utf-8")
                src.chmod(0o644)
                built: list[Path] = []
                if self.type in INDEXED:
                    commands.postmap(self.postfix_config, f"{self.type}:{src}")
                    built = [p for p in tmp.iterdir() if p.name != name]
                for p in built:  # the index first: Postfix warns about an index older than its source
                    p.chmod(0o644)
                    os.replace(p, d / p.name)
                os.replace(src, self.path)
                dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except commands.CommandFailed as e:
                # what postmap said, with the temporary directory's name put back to the map's (one message
                # per cause: the keeper logs each once)
                said = (e.output.strip().splitlines() or [f"exit {e.returncode}"])[-1].replace(str(tmp), str(d))
                raise AliasMapError(f"postmap {self.type}:{self.path}: {said}") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            raise AliasMapError(f"{self.path}: {e.strerror or e}") from None
        except commands.CommandNotRun as e:
            raise AliasMapError(f"postmap {self.type}:{self.path}: {e}") from None
        finally:
            with contextlib.suppress(OSError):
                os.close(lock)
        self.written = text


def sync_now(cfg: Config, store: Store) -> tuple[bool, str]:
    """After a change on the command line: write this host's map at once. (written or up to date, one line)."""
    amap = AliasMap.from_postfix(cfg)
    if amap is None:
        return False, "Postfix's virtual_alias_maps names no map autoport writes (`autoport doctor` says more)"
    try:
        amap.sync(store)
    except AliasMapError as e:
        return False, f"alias map not written here ({e}); the running sidecar writes it within seconds"
    return True, f"alias map {amap.spec} up to date"


class Keeper:
    """The daemon's thread: this node's map follows the store (changes made on another node, or by a CLI that
    could not write the map). Store or postmap trouble is logged once per cause; the next look tries again."""

    def __init__(self, cfg: Config, store: Store, *, interval: float = 5.0) -> None:
        self.cfg = cfg
        self.store = store
        self.interval = interval
        self.map: AliasMap | None = None
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.last_error = ""

    def start(self) -> bool:
        """Find the map and write it once now; False (nothing started) when main.cf names none of ours."""
        self.map = AliasMap.from_postfix(self.cfg)
        if self.map is None:
            return False
        self.tick()
        self.thread = threading.Thread(target=self._loop, name="alias-map", daemon=True)
        self.thread.start()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        if self.thread:
            self.thread.join(timeout)

    def _loop(self) -> None:
        while not self.stopping.wait(self.interval):
            self.tick()

    def tick(self) -> None:
        from sidecar.store.base import StoreError

        assert self.map is not None
        try:
            if self.map.sync(self.store):
                log.info("alias map %s written (%d entries)", self.map.spec, self.map.written.count("\n") - 1)
            self.last_error = ""
        except (AliasMapError, StoreError) as e:
            if str(e) != self.last_error:
                log.warning("alias map %s not written: %s", self.map.spec, e)
            self.last_error = str(e)
