"""`autoport doctor`: is this host set up right? Every problem printed with its fix; exit 0 (healthy) or 1.

More (the reasons and limits behind this module): docs/modules.md, sidecar/ops/doctor.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import grp
import imaplib
import os
import poplib
import re
import smtplib
import socket
import ssl
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from sidecar.config import Config, unix_path
from sidecar.mta import commands

OK = "ok"
PROBLEM = "PROBLEM"
NOTE = "note"
DOCTOR_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class Finding:
    status: str  # ok | PROBLEM | note
    check: str  # config, sockets, store, postfix, dovecot, legacy, admin
    message: str
    fix: str = ""

    def render(self) -> str:
        head = f"[{self.status:>7}] {self.check}: {self.message}"
        return head + (f"\n          fix: {self.fix}" if self.fix else "")


def _ok(check: str, message: str) -> Finding:
    return Finding(OK, check, message)


def _bad(check: str, message: str, fix: str) -> Finding:
    return Finding(PROBLEM, check, message, fix)


# --- sockets -----------------------------------------------------------------------------------------------


def check_socket(name: str, path: str, group: str, mode: int, key: str) -> Iterator[Finding]:
    where = f"{name} socket {path}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        yield _bad("sockets", f"{where} does not exist", "start the sidecar (`autoport serve`), or correct "
                   f"[sockets] {key} to where it listens")  # fmt: skip
        return
    except OSError as e:
        yield _bad("sockets", f"{where}: {e.strerror}", "check the directory's permissions")
        return
    if not stat.S_ISSOCK(st.st_mode):
        yield _bad(
            "sockets", f"{where} is not a socket", f"remove it and restart the sidecar; or correct [sockets] {key}"
        )
        return
    problems = False
    try:
        want_gid: int | None = grp.getgrnam(group).gr_gid
    except KeyError:
        want_gid = None
        problems = True
        yield _bad("sockets", f"{where}: group {group!r} does not exist",
                   f"install the service that owns it, or set [sockets] {key.replace('auth', 'auth_group')} "
                   "to the right group")  # fmt: skip
    if want_gid is not None and st.st_gid != want_gid:
        problems = True
        have = _group_name(st.st_gid)
        yield _bad("sockets", f"{where} has group {have}, needs {group}",
                   f"chgrp {group} {path} (the sidecar sets it at start: restart it, and check [sockets])")  # fmt: skip
    have_mode = stat.S_IMODE(st.st_mode)
    if have_mode != mode:
        problems = True
        yield _bad("sockets", f"{where} has mode {have_mode:04o}, needs {mode:04o} (the {group} group must "
                   "connect to it)", f"chmod {mode:04o} {path} (the sidecar sets [sockets] mode at start: "
                   "restart it)")  # fmt: skip
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(path)
        except OSError as e:
            problems = True
            yield _bad("sockets", f"{where}: nobody answers ({e.strerror})", "start the sidecar (`autoport serve`)")
    if not problems:
        yield _ok("sockets", f"{where}: group {group}, mode {mode:04o}, listening")


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def check_sockets(cfg: Config) -> Iterator[Finding]:
    sk = cfg.sockets
    yield from check_socket("auth", sk.auth, sk.auth_group, sk.mode, "auth")
    sm = unix_path(sk.socketmap)
    if sm:
        yield from check_socket("socketmap", sm, sk.postfix_group, sk.mode, "socketmap")
    milter = unix_path(sk.milter)
    if milter:
        yield from check_socket("milter", milter, sk.postfix_group, sk.mode, "milter")
    if sk.sasl:
        yield from check_socket("SMTP AUTH relay", sk.sasl, sk.postfix_group, sk.mode, "sasl")
        # Dovecot's listener the relay forwards to (dovecot/conf.d/10-master.conf.j2, 0660 postfix)
        upstream = "Dovecot auth (relay upstream)"
        yield from check_socket(upstream, sk.dovecot_auth, sk.postfix_group, 0o660, "dovecot_auth")


# --- store -------------------------------------------------------------------------------------------------


def check_store(cfg: Config) -> tuple[list[Finding], list[str], bool]:
    """(findings, a few account addresses, finalized)."""
    from sidecar.store import open_store
    from sidecar.store.base import StoreError
    from sidecar.store.schema import MIGRATIONS

    latest = MIGRATIONS[-1].version
    try:
        store = open_store(cfg.store.url, dovecot_group=cfg.store.dovecot_group, dovecot_role=cfg.store.dovecot_role)
    except (StoreError, ValueError, OSError) as e:
        return (
            [_bad("store", f"cannot open the state store: {e}", "check [store] url and the database server")],
            [],
            False,
        )
    try:
        version = store.schema_version()
        if version < latest:
            return [_bad("store", f"schema version {version}, this autoport needs {latest}",
                         "autoport store upgrade" if version else "autoport store init")], [], False  # fmt: skip
        users = []
        for a in store.accounts():
            users.append(a.address)
            if len(users) >= 3:
                break
        from sidecar.ops.finalize import finalized_at

        done = finalized_at(store) is not None
        found = [_ok("store", f"reachable, schema version {version}")]
        listed = {e.name for e in store.inventory("account")}
        if listed:
            found.append(_ok("inventory", f"{len(listed)} legacy account(s) listed (autoport inventory)"))
        elif not done:
            found.append(Finding(NOTE, "inventory", "the legacy server's account list was never read: finalize "
                                 "refuses until `autoport inventory --from legacy|ldap|file FILE`"))  # fmt: skip
        return found, users, done
    except StoreError as e:
        return (
            [_bad("store", f"the state store does not answer: {e}", "check [store] url and the database server")],
            [],
            False,
        )
    finally:
        with contextlib.suppress(Exception):
            store.close()


# --- Postfix and Dovecot fragments -------------------------------------------------------------------------


def _cmd(argv: list[str]) -> tuple[int, str]:
    try:
        r = commands.run(argv, timeout=60, check=False)
    except commands.CommandNotRun as e:
        return 127, str(e)
    return r.returncode, r.out + r.err


def check_postfix(cfg: Config, finalized: bool) -> Iterator[Finding]:
    from sidecar.mta.render import postfix_socketmap

    pf_dir = cfg.target.postfix_config or "/etc/postfix"
    sm = postfix_socketmap(cfg.sockets.socketmap)
    fix = "deploy postfix/main.cf.j2 (Ansible postfix role, or sidecar.mta.render.render_postfix) and `postfix reload`"
    rc, out = _cmd(commands.postfix_argv(pf_dir, "postconf", "-h", "transport_maps", "address_verify_transport_maps",
                                         "smtpd_milters"))  # fmt: skip
    if rc != 0:
        yield _bad("postfix", f"postconf -c {pf_dir} failed: {out.strip()[-300:]}", "set [target] postfix_config")
        return
    lines = [*out.splitlines(), "", "", ""][:3]
    if finalized:
        if sm in out or cfg.sockets.milter in lines[2]:
            yield _bad("postfix", "finalize ran, but Postfix still uses the sidecar", "autoport finalize (again)")
        else:
            yield _ok("postfix", "final configuration (no sidecar)")
        return
    wanted = [
        ("transport_maps", lines[0], f"socketmap:{sm}:transport"),
        ("address_verify_transport_maps", lines[1], f"socketmap:{sm}:verify"),
        ("smtpd_milters", lines[2], cfg.sockets.milter),
    ]
    bad = False
    for name, value, want in wanted:
        if want not in value:
            bad = True
            yield _bad("postfix", f"{name} = {value.strip() or '(empty)'} does not name {want}", fix)
    if not bad:
        yield _ok("postfix", f"{pf_dir}/main.cf routes through {sm} and logs through {cfg.sockets.milter}")
    yield from check_alias_map(cfg, sm)


def check_alias_map(cfg: Config, sm: str) -> Iterator[Finding]:
    """Postfix's virtual_alias_maps: the file map the sidecar keeps (sidecar/mta/aliasmap.py)."""
    from sidecar.mta import aliasmap

    pf_dir = cfg.target.postfix_config or "/etc/postfix"
    fix = "render main.cf again (postfix/main.cf.j2 alias_maps; Ansible postfix role) and `postfix reload`"
    rc, out = _cmd(commands.postfix_argv(pf_dir, "postconf", "-h", "virtual_alias_maps"))
    if rc != 0:
        return
    if f"socketmap:{sm}:virtual" in out:
        yield _bad("aliases", "virtual_alias_maps is the sidecar's socketmap: while the sidecar restarts, cleanup "
                   "refuses mail and Postfix's verification probes (an address probed then gets 450 for ~17 min)",
                   fix)  # fmt: skip
        return
    amap = aliasmap.AliasMap.from_value(out, cfg.target.postfix_config)
    if amap is None:
        yield _bad("aliases", f"virtual_alias_maps = {out.strip() or '(empty)'} names no map autoport writes: "
                   "`autoport alias` and imported extra addresses do not reach Postfix", fix)  # fmt: skip
        return
    suffix = aliasmap.INDEXED.get(amap.type, "")
    if not Path(f"{amap.path}{suffix}").is_file():
        yield _bad("aliases", f"{amap.path}{suffix} is missing: Postfix's cleanup cannot open {amap.spec}",
                   "autoport alias sync (as the sidecar's user)")  # fmt: skip
        return
    yield _ok("aliases", f"virtual_alias_maps = {amap.spec} (written by the sidecar from the store)")


def check_dovecot(cfg: Config, finalized: bool) -> Iterator[Finding]:
    conf = cfg.target.dovecot_config or "/etc/dovecot/dovecot.conf"
    rc, out = _cmd(["doveconf", "-c", conf, "-n"])
    if rc != 0:
        yield _bad("dovecot", f"doveconf -c {conf} -n failed: {out.strip()[-300:]}",
                   "fix the Dovecot configuration, or set [target] dovecot_config")  # fmt: skip
        return
    # 2.3 prints `passdb {`; 2.4 names the blocks (`passdb sql {`), the name standing for a missing driver
    passdbs = []
    for m in re.finditer(r"^passdb(?: (\S+))? \{\n(.*?)^\}", out, re.M | re.S):
        settings = _settings(m.group(2))
        settings.setdefault("driver", m.group(1) or "")
        passdbs.append(settings)
    cps = [p for p in passdbs if p.get("driver") in ("checkpassword", "lua")]
    if finalized:
        if cps:
            yield _bad("dovecot", "finalize ran, but Dovecot still asks the sidecar", "autoport finalize (again)")
        else:
            yield _ok("dovecot", "final configuration (sql passdb only)")
        return
    fix = "deploy dovecot/conf.d/10-auth.conf.j2 (Ansible dovecot role) and `doveadm reload`"
    if not cps:
        yield _bad("dovecot", f"{conf}: no checkpassword passdb", fix)
        return
    if cps[0].get("driver") == "lua":  # Dovecot 2.4: dovecot/2.4/autoport-passdb.lua asks the sidecar
        yield from _check_lua_passdb(cfg, conf, cps[0], passdbs, fix)
        return
    line = cps[0].get("args", "")
    if "checkpassword" not in line or f"--socket {cfg.sockets.auth}" not in line:
        yield _bad("dovecot", f"checkpassword passdb runs {line!r}, not our shim with --socket {cfg.sockets.auth}", fix)
        return
    if not passdbs or passdbs[0].get("driver") != "sql":
        yield _bad("dovecot", f"{conf}: the first passdb is not the store's sql (migrated accounts)", fix)
        return
    yield _ok("dovecot", f"{conf}: sql passdb, then checkpassword through {cfg.sockets.auth}")


def _check_lua_passdb(
    cfg: Config, conf: str, lua: dict[str, str], passdbs: list[dict[str, str]], fix: str
) -> Iterator[Finding]:
    script = lua.get("lua_file", "")
    if not script:
        yield _bad("dovecot", f"{conf}: lua passdb without lua_file", fix)
        return
    try:
        with open(script, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        yield _bad("dovecot", f"lua passdb script {script}: {e.strerror}", fix)
        return
    if "AUTH1" not in text or f'"{cfg.sockets.auth}"' not in text:
        yield _bad("dovecot", f"lua passdb {script} is not autoport's, asking {cfg.sockets.auth}", fix)
        return
    if not passdbs or passdbs[0].get("driver") != "sql":
        yield _bad("dovecot", f"{conf}: the first passdb is not the store's sql (migrated accounts)", fix)
        return
    yield _ok("dovecot", f"{conf}: sql passdb, then the Lua passdb (Dovecot 2.4) through {cfg.sockets.auth}")


def _settings(block: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.splitlines():
        key, sep, value = line.strip().partition(" = ")
        if sep:
            out[key] = value
    return out


# --- the legacy server -------------------------------------------------------------------------------------


def _tls_fix(e: ssl.SSLError, cfg: Config) -> tuple[str, str]:
    lg = cfg.legacy
    if isinstance(e, ssl.SSLCertVerificationError):
        msg = f"certificate problem: {e.verify_message}"
        if "hostname" in (e.verify_message or "").lower() or "ip address mismatch" in (e.verify_message or "").lower():
            return msg, (f"set [legacy] tls_server_name to the name in the legacy certificate (now "
                         f"{lg.tls_server_name or lg.host!r})")  # fmt: skip
        now = repr(lg.ca_file) if lg.ca_file else "the system store"
        return (
            msg,
            f"set [legacy] ca_file to the CA that signed the legacy certificate (now {now}); or tls_verify = false",
        )
    return f"TLS handshake failed: {e}", "check [legacy] *_tls (starttls vs implicit) and the port"


def _probe(name: str, port: int, tls: str, cfg: Config, talk: Callable[[float, ssl.SSLContext], str]) -> Finding:
    from sidecar.legacy.tls import tls_context

    lg = cfg.legacy
    where = f"{name} {lg.host}:{port} ({tls})"
    port_key = {"IMAP": "imap_port", "POP3": "pop3_port", "SMTP": "smtp_port", "submission": "submission_port",
                "ManageSieve": "sieve_port"}[name]  # fmt: skip
    try:
        ctx = tls_context(lg)
    except (OSError, ssl.SSLError) as e:
        return _bad("legacy", f"cannot load [legacy] ca_file {lg.ca_file!r}: {e}", "point ca_file at a PEM CA file")
    try:
        detail = talk(min(lg.timeout, DOCTOR_TIMEOUT), ctx)
    except ssl.SSLError as e:
        msg, fix = _tls_fix(e, cfg)
        return _bad("legacy", f"{where}: {msg}", fix)
    except (OSError, EOFError) as e:
        cause = getattr(e, "__cause__", None) or getattr(e, "__context__", None)
        if isinstance(cause, ssl.SSLError):
            msg, fix = _tls_fix(cause, cfg)
            return _bad("legacy", f"{where}: {msg}", fix)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        return _bad("legacy", f"{where}: not reachable: {reason}",
                    f"check [legacy] host and {port_key} (0 turns the protocol off), and the firewall")  # fmt: skip
    except (imaplib.IMAP4.error, poplib.error_proto, smtplib.SMTPException, ValueError) as e:
        return _bad("legacy", f"{where}: unexpected answer: {str(e)[:200]}",
                    f"check that {port_key} is the {name} port and [legacy] the TLS mode")  # fmt: skip
    except Exception as e:  # the ManageSieve client's own errors
        from sidecar.legacy.managesieve import SieveError

        if not isinstance(e, SieveError):
            raise
        cause = e.__cause__ or e.__context__
        if "certificate" in str(e) or isinstance(cause, ssl.SSLError):
            fix = ("set [legacy] tls_server_name to the name in the legacy certificate, or ca_file to its CA"
                   if "certificate" in str(e) else "check [legacy] sieve_tls")  # fmt: skip
            return _bad("legacy", f"{where}: {e}", fix)
        return _bad("legacy", f"{where}: {e}", f"check [legacy] host and {port_key} (0: no ManageSieve)")
    return _ok("legacy", f"{where}: {detail}")


def _imap(cfg: Config, implicit: bool, starttls: bool) -> Callable[[float, ssl.SSLContext], str]:
    def talk(timeout: float, ctx: ssl.SSLContext) -> str:
        lg = cfg.legacy
        c = (imaplib.IMAP4_SSL(lg.host, lg.imap_port, ssl_context=ctx, timeout=timeout) if implicit
             else imaplib.IMAP4(lg.host, lg.imap_port, timeout=timeout))  # fmt: skip
        try:
            if starttls:
                if "STARTTLS" not in c.capabilities:
                    raise ValueError("no STARTTLS offered; set imap_tls = implicit or none")
                c.starttls(ssl_context=ctx)
            return "greeting and TLS ok" if implicit or starttls else "greeting ok (no TLS configured)"
        finally:
            with contextlib.suppress(Exception):
                c.logout()

    return talk


def _pop3(cfg: Config, implicit: bool, starttls: bool) -> Callable[[float, ssl.SSLContext], str]:
    def talk(timeout: float, ctx: ssl.SSLContext) -> str:
        lg = cfg.legacy
        p = (poplib.POP3_SSL(lg.host, lg.pop3_port, context=ctx, timeout=timeout) if implicit
             else poplib.POP3(lg.host, lg.pop3_port, timeout=timeout))  # fmt: skip
        try:
            if starttls:
                p.stls(context=ctx)
            return "greeting and TLS ok" if implicit or starttls else "greeting ok (no TLS configured)"
        finally:
            with contextlib.suppress(Exception):
                p.quit()

    return talk


def _smtp(cfg: Config, port: int, implicit: bool, starttls: bool) -> Callable[[float, ssl.SSLContext], str]:
    def talk(timeout: float, ctx: ssl.SSLContext) -> str:
        host = cfg.legacy.host
        s = (smtplib.SMTP_SSL(host, port, context=ctx, timeout=timeout) if implicit
             else smtplib.SMTP(host, port, timeout=timeout))  # fmt: skip
        try:
            s.ehlo()
            if starttls:
                if not s.has_extn("starttls"):
                    raise ValueError("no STARTTLS offered; set the *_tls key to implicit or none")
                s.starttls(context=ctx)
                s.ehlo()
            return "greeting and TLS ok" if implicit or starttls else "greeting ok (no TLS configured)"
        finally:
            with contextlib.suppress(Exception):
                s.quit()

    return talk


def _sieve(cfg: Config) -> Callable[[float, ssl.SSLContext], str]:
    def talk(timeout: float, ctx: ssl.SSLContext) -> str:
        from sidecar.legacy.managesieve import ManageSieveClient

        lg = cfg.legacy
        with ManageSieveClient(lg.host, lg.sieve_port, tls=lg.sieve_tls, ssl_context=ctx, timeout=timeout) as c:
            c.logout()
        return "greeting and TLS ok" if lg.sieve_tls != "none" else "greeting ok (no TLS configured)"

    return talk


def check_legacy(cfg: Config) -> Iterator[Finding]:
    lg = cfg.legacy
    protocols = [
        ("IMAP", lg.imap_port, lg.imap_tls),
        ("POP3", lg.pop3_port, lg.pop3_tls),
        ("SMTP", lg.smtp_port, lg.smtp_tls),
        ("submission", lg.submission_port, lg.submission_tls),
        ("ManageSieve", lg.sieve_port, lg.sieve_tls),
    ]
    for name, port, tls in protocols:
        if not port:
            continue
        implicit, starttls = tls == "implicit", tls == "starttls"
        if name == "IMAP":
            talk = _imap(cfg, implicit, starttls)
        elif name == "POP3":
            talk = _pop3(cfg, implicit, starttls)
        elif name == "ManageSieve":
            talk = _sieve(cfg)
        else:
            talk = _smtp(cfg, port, implicit, starttls)
        yield _probe(name, port, tls, cfg, talk)


def check_admin(cfg: Config, users: list[str]) -> Iterator[Finding]:
    lg = cfg.legacy
    if not lg.admin_user:
        return
    if not lg.admin_password:
        yield _bad("admin", f"legacy admin_user {lg.admin_user!r} has no admin_password", "set [legacy] admin_password")
        return
    if not lg.imap_port:
        yield Finding(NOTE, "admin", "admin credentials not checked: no legacy IMAP (imap_port = 0)")
        return
    if not users:
        yield Finding(NOTE, "admin", "admin credentials not checked: the store has no account to log in as yet")
        return
    from sidecar.legacy.imap import LegacySource
    from sidecar.migration.copier import SourceAuthError, SourceError, SourceParams

    user = users[0]
    params = dataclasses.replace(SourceParams.from_config(lg, user, use_admin=True), timeout=min(lg.timeout, 10))
    if params.ssl_context is None and lg.imap_tls != "none":
        from sidecar.legacy.tls import tls_context

        params = dataclasses.replace(params, ssl_context=tls_context(lg))
    try:
        src = LegacySource(params)
        src.connect()
        src.close()
    except SourceAuthError:
        how = f"{user}{lg.master_separator}{lg.admin_user}" if lg.admin_mode == "master" else (
            f"SASL PLAIN authzid={user} authcid={lg.admin_user}")  # fmt: skip
        yield _bad("admin", f"the legacy server refused the admin login ({lg.admin_mode}: {how})",
                   "check [legacy] admin_user, admin_password, admin_mode (authzid or master) and "
                   "master_separator against the legacy server's master-user setup")  # fmt: skip
        return
    except SourceError as e:
        yield _bad("admin", f"admin login not checked: {e}", "see the legacy IMAP finding above")
        return
    yield _ok("admin", f"{lg.admin_user} logs in as {user} ({lg.admin_mode})")


# --- what clients were offered -------------------------------------------------------------------------------


def check_offer(cfg: Config) -> Iterator[Finding]:
    from sidecar.legacy import offer as offer_mod

    try:
        found = offer_mod.probe(cfg.legacy, timeout=DOCTOR_TIMEOUT)
    except (OSError, ssl.SSLError) as e:
        yield Finding(NOTE, "offer", f"the legacy server's offer was not asked: {e}")
        return
    seen = []
    for name, o in (("SMTP", found.smtp), ("submission", found.submission), ("smtps", found.smtps)):
        if o.reachable:
            size = "no SIZE" if o.size is None else f"SIZE {o.size or 'unlimited'}"
            seen.append(f"{name} {o.port}: AUTH {' '.join(o.auth) or '(none)'}, {size}")
    if found.plaintext_login is not None:
        seen.append("plain-text logins " + ("allowed" if found.plaintext_login else "refused"))
    missing = offer_mod.shortfalls(cfg, found)
    summary = "; ".join(seen) or "nothing answered"
    if missing:
        yield _bad("offer", f"the target offers less than the legacy server ({summary})",
                   f"set in [target]: {', '.join(missing)}; render Postfix and Dovecot again (Ansible: "
                   "postfix_smtps_listen, postfix_smtpd_sasl_auth_enable, postfix_message_size_limit, "
                   "dovecot_disable_plaintext_auth)")  # fmt: skip
    else:
        yield _ok("offer", f"the target offers what the legacy server did ({summary})")
    for note in found.notes:
        yield Finding(NOTE, "offer", note)


# --- the namespace clients see ------------------------------------------------------------------------------


def dovecot_namespace(conf: str) -> tuple[str, str] | None:
    """(prefix, separator) of the inbox namespace in `doveconf -c conf -n`, None when it cannot be read."""
    rc, out = _cmd(["doveconf", "-c", conf, "-n"])
    if rc != 0:
        return None
    m = re.search(r"^namespace inbox \{\n(.*?)^\}", out, re.M | re.S)
    if m is None:
        return None
    top = _settings("\n".join(x for x in m.group(1).splitlines() if x[:3] != "   "))  # not nested blocks
    # doveconf -n leaves out defaults: prefix "", separator "" (Maildir++: ".")
    return top.get("prefix", ""), top.get("separator", "") or "."


def check_namespace(cfg: Config, users: list[str], finalized: bool) -> Iterator[Finding]:
    from sidecar.legacy import namespace

    conf = cfg.target.dovecot_config or "/etc/dovecot/dovecot.conf"
    shown = dovecot_namespace(conf)
    if shown is None:
        return  # the dovecot check above already says why
    auto = "auto" in (cfg.mail.namespace_prefix, cfg.mail.namespace_separator)
    legacy_ns: tuple[str, str] | None = None
    lg = cfg.legacy
    if auto and not finalized:
        if not (lg.admin_user and lg.admin_password and users):
            why = "no legacy admin credentials" if not lg.admin_user else "no account in the store yet"
            yield Finding(NOTE, "namespace", f"target shows prefix {shown[0]!r}, separator {shown[1]!r}; the legacy "
                          f"NAMESPACE was not asked ({why}): compare with what a legacy IMAP client shows")  # fmt: skip
            return
        from sidecar.migration.copier import SourceError

        try:
            legacy_ns = namespace.probe(lg, users[0], use_admin=True)
        except SourceError as e:
            yield Finding(NOTE, "namespace", f"legacy NAMESPACE not asked: {e}")
            return
    want = namespace.resolve(cfg, legacy_ns)
    if shown == (want.prefix, want.separator):
        where = "the legacy server's NAMESPACE" if legacy_ns is not None else "[mail] namespace_*"
        yield _ok("namespace", f"target shows prefix {want.prefix!r}, separator {want.separator!r}, as {where}")
        return
    yield _bad(
        "namespace",
        f"target Dovecot shows prefix {shown[0]!r}, separator {shown[1]!r}; it should show prefix {want.prefix!r}, "
        f"separator {want.separator!r}" + (" (the legacy server's)" if legacy_ns is not None else ""),
        f'set [mail] namespace_prefix = "{want.prefix}" and namespace_separator = "{want.separator}" (Ansible: '
        "dovecot_namespace_prefix / dovecot_namespace_separator), render Dovecot's configuration again and "
        "`doveadm reload`; before any account is migrated, or clients see renamed folders",
    )


# --- all of it ---------------------------------------------------------------------------------------------


def run(cfg: Config) -> list[Finding]:
    findings: list[Finding] = [_ok("config", f"{cfg.path or 'defaults'} loads")]
    findings += check_sockets(cfg)
    store_findings, users, finalized = check_store(cfg)
    findings += store_findings
    if finalized:
        findings = [f for f in findings if f.check != "sockets"]  # the sidecar is no longer needed
        findings.append(Finding(NOTE, "store", "finalize has run: the sidecar's sockets are not needed any more"))
    findings += check_postfix(cfg, finalized)
    findings += check_dovecot(cfg, finalized)
    legacy_findings = list(check_legacy(cfg))
    findings += legacy_findings
    imap_down = any(f.status == PROBLEM and f.message.startswith("IMAP ") and "not reachable" in f.message
                    for f in legacy_findings)  # fmt: skip
    pop3_up = any(f.status == OK and f.message.startswith("POP3 ") for f in legacy_findings)
    if imap_down and pop3_up:
        findings.append(Finding(NOTE, "legacy", "only POP3 answers: if the legacy server has no IMAP, set [legacy] "
                                "imap_port = 0, and INBOX is copied over POP3 (UIDLs and order kept)"))  # fmt: skip
    findings += check_admin(cfg, users)
    if not finalized:
        findings += check_offer(cfg)
    findings += check_namespace(cfg, users, finalized)
    return findings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "doctor", help="check the config, sockets, store, Postfix/Dovecot fragments and the legacy server"
    )
    s.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from sidecar import config as config_mod

    path = args.config or os.environ.get("AUTOPORT_CONFIG") or config_mod.DEFAULT_PATH
    try:
        cfg = config_mod.load(path)
    except config_mod.ConfigError as e:
        print(Finding(PROBLEM, "config", str(e), f"edit {path}; `autoport config` prints every key").render())
        return 1
    findings = run(cfg)
    for f in findings:
        print(f.render())
    problems = sum(1 for f in findings if f.status == PROBLEM)
    print(f"{problems} problem(s)" if problems else "no problems found")
    return 1 if problems else 0
