"""Sieve scripts from the legacy server's ManageSieve (RFC 5804) into the target's Pigeonhole layout.

    result = copy_scripts(cfg.legacy, login, password, home, owner=(uid, gid))      # the user's password
    result = copy_scripts(cfg.legacy, login, "", home, owner=..., use_admin=True)   # legacy admin credentials
    result.scripts == {"filters": b"...", "vacation": b"..."}; result.active == "filters"

More (the reasons and limits behind this module): docs/modules.md, sidecar/migration/sieve.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.legacy.managesieve import (
    _SAFE_NAME,
    MAX_SCRIPTS,
    ManageSieveClient,
    SieveScriptError,
)

if TYPE_CHECKING:
    from sidecar.config import Config, LegacyConfig
    from sidecar.legacy.limit import LegacyLimiter
    from sidecar.migration.copier import SourceParams
    from sidecar.store.base import Store

log = logging.getLogger("sidecar.migration.sieve")

Owner = tuple[int, int] | None

# --- the copy ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SieveResult:
    scripts: dict[str, bytes]  # name -> body, as written
    active: str | None  # the active script's name, or None
    skipped: tuple[str, ...] = ()  # "name: reason" of scripts that could not be carried over
    renamed: tuple[str, ...] = ()  # "script: fileinto old -> new": folder names the target shows differently


def fetch_scripts(
    legacy: LegacyConfig,
    login: str,
    password: str = "",
    *,
    use_admin: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    limiter: LegacyLimiter | None = None,
) -> SieveResult:
    """Every script of `login` on the legacy server and which one is active (not written anywhere)."""
    ctx = ssl_context
    if ctx is None and legacy.sieve_tls != "none":
        from sidecar.legacy.tls import tls_context

        ctx = tls_context(legacy)
    with ManageSieveClient(
        legacy.host, legacy.sieve_port, tls=legacy.sieve_tls, ssl_context=ctx, timeout=legacy.timeout, limiter=limiter
    ) as c:
        if use_admin and legacy.admin_mode == "master":
            c.authenticate(f"{login}{legacy.master_separator}{legacy.admin_user}", legacy.admin_password)
        elif use_admin:
            c.authenticate(legacy.admin_user, legacy.admin_password, authzid=login)
        else:
            c.authenticate(login, password)
        listed = c.listscripts()
        if len(listed) > MAX_SCRIPTS:
            raise SieveScriptError(f"{len(listed)} scripts, more than the limit of {MAX_SCRIPTS}")
        scripts: dict[str, bytes] = {}
        skipped: list[str] = []
        active: str | None = None
        for name, is_active in listed:
            if not _SAFE_NAME.match(name):
                skipped.append(f"{name!r}: not usable as a file name on the target")
                continue
            try:
                scripts[name] = c.getscript(name)
            except SieveScriptError as e:
                skipped.append(f"{name!r}: {e}")
                continue
            if is_active:
                active = name
        c.logout()
    return SieveResult(scripts, active, tuple(skipped))


_FILEINTO = re.compile(
    rb'(\bfileinto\b(?:\s+:[A-Za-z_]+(?:\s+(?:"(?:[^"\\]|\\.)*"|\[[^\]]*\]))?)*\s+)"((?:[^"\\]|\\.)*)"',
    re.IGNORECASE,
)


def rewrite_fileinto(script: bytes, names: dict[str, str]) -> tuple[bytes, list[str]]:
    """The script with each `fileinto` folder found in `names` (legacy name -> name on the target) replaced;
    and the replacements made, "old -> new". Tags (:copy, :create, :flags ...) are kept; anything else is
    left byte for byte."""
    changed: list[str] = []

    def sub(m: re.Match[bytes]) -> bytes:
        raw = m.group(2)
        try:
            name = re.sub(rb"\\(.)", rb"\1", raw).decode("utf-8")
        except UnicodeDecodeError:
            return m.group(0)
        new = names.get(name)
        if new is None or new == name:
            return m.group(0)
        changed.append(f"{name} -> {new}")
        quoted = new.encode("utf-8").replace(b"\\", b"\\\\").replace(b'"', b'\\"')
        return m.group(1) + b'"' + quoted + b'"'

    return _FILEINTO.sub(sub, script), changed


def target_folder_names(cfg: Config, source: SourceParams) -> dict[str, str]:
    """Legacy folder name -> the name the target shows for it, where they differ (the copier's folder plan in
    the target namespace). One IMAP session on the legacy server; {} when it has no IMAP."""
    if not source.imap_port:
        return {}
    from sidecar.legacy.imap import LegacySource
    from sidecar.legacy.namespace import resolve
    from sidecar.migration.copier.folders import FolderMapper

    with LegacySource(source) as src:
        prefix, sep = src.namespace()
        listing = src.list_folders()
    mapper = FolderMapper(sep or (listing[0].delimiter if listing else None), prefix)
    ns = resolve(cfg, (prefix, sep or "/"))
    return {p.legacy: ns.name(p.target) for p in mapper.plan(listing) if ns.name(p.target) != p.legacy}


def write_scripts(home: Path, result: SieveResult, owner: Owner) -> None:
    """Pigeonhole's file layout in `home`: sieve/NAME.sieve (0600) and .dovecot.sieve -> sieve/ACTIVE.sieve.

    Scripts already in ~/sieve with other names are left alone (the copy runs before cutover, while nothing
    else writes this home; a rerun rewrites the same files).
    """
    from sidecar.migration.copier.maildir import write_file_atomic

    _mkdir(home, owner)
    sdir = home / "sieve"
    _mkdir(sdir, owner)
    for name, body in result.scripts.items():
        write_file_atomic(sdir / f"{name}.sieve", body, owner, 0o600)
    link = home / ".dovecot.sieve"
    if result.active is None or result.active not in result.scripts:
        if link.is_symlink():
            link.unlink()
        return
    tmp = home / ".dovecot.sieve.autoport-tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(f"sieve/{result.active}.sieve")
    if owner is not None:
        os.lchown(tmp, *owner)
    os.replace(tmp, link)


def _mkdir(path: Path, owner: Owner) -> None:
    if path.is_dir():
        return
    path.mkdir(mode=0o700, parents=True)
    if owner is not None:
        os.chown(path, *owner)


def copy_scripts(
    legacy: LegacyConfig,
    login: str,
    password: str,
    home: Path,
    *,
    owner: Owner,
    use_admin: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    folder_names: dict[str, str] | None = None,
    limiter: LegacyLimiter | None = None,
) -> SieveResult:
    """fetch_scripts + write_scripts, `fileinto` folders renamed per folder_names (legacy -> target name).
    Raises SieveError (and subclasses); the caller records the failure."""
    result = fetch_scripts(legacy, login, password, use_admin=use_admin, ssl_context=ssl_context, limiter=limiter)
    if folder_names:
        renamed: list[str] = []
        scripts = {}
        for name, body in result.scripts.items():
            scripts[name], changed = rewrite_fileinto(body, folder_names)
            renamed += [f"{name}: fileinto {c}" for c in changed]
        result = dataclasses.replace(result, scripts=scripts, renamed=tuple(renamed))
    write_scripts(home, result, owner)
    return result


def mail_owner(cfg: Config) -> tuple[int, int]:
    """(uid, gid) owning mail files: target.mail_uid/mail_gid, else target.mail_user's."""
    t = cfg.target
    if t.mail_uid:
        return t.mail_uid, t.mail_gid or t.mail_uid
    import pwd

    pw = pwd.getpwnam(t.mail_user)
    return pw.pw_uid, pw.pw_gid


def copy_for_account(cfg: Config, store: Store, address: str, source: SourceParams) -> SieveResult | None:
    """The job runner's step after the initial copy: the account's scripts, with the copy's credentials.

    Never raises: a failure is an event of kind "sieve-failed" (the report lists it) and the migration goes on;
    so is each script left behind. A copy that worked is an event of kind "sieve".
    """
    from sidecar.migration.copier import SourceError, target_home

    names_error = ""
    try:
        names = target_folder_names(cfg, source)
    except SourceError as e:  # the scripts still come over, their folder names as they were
        names, names_error = {}, str(e)
    try:
        result = copy_scripts(
            cfg.legacy,
            source.user,
            source.password,
            target_home(cfg.target.mail_root, address),
            owner=mail_owner(cfg),
            use_admin=bool(source.admin_user),
            ssl_context=source.ssl_context,
            folder_names=names,
            limiter=source.limiter,
        )
    except Exception as e:  # refused, unreachable, disk trouble: mail matters more than filters
        with contextlib.suppress(Exception):
            store.record_event(address, "sieve-failed", f"Sieve rules not carried over: {e}")
        log.warning("Sieve scripts of %s not copied: %s", address, e)
        return None
    with contextlib.suppress(Exception):
        for skipped in result.skipped:
            store.record_event(address, "sieve-failed", f"Sieve script not carried over: {skipped}")
        if result.scripts:
            store.record_event(
                address, "sieve", f"{len(result.scripts)} Sieve script(s) copied; active: {result.active or '(none)'}"
            )
        if names_error and result.scripts:
            store.record_event(address, "sieve-failed", f"Sieve fileinto folder names not checked: {names_error}")
        for renamed in result.renamed:
            store.record_event(address, "sieve", f"Sieve folder renamed as the target shows it: {renamed}")
    return result
