"""Render the Postfix and Dovecot fragments (postfix/*.j2, dovecot/*.j2) and validate the result.

The templates are the ones Ansible deploys; they use plain ``{{ variable }}`` substitutions and simple
``{% if %}`` only, so both renderers agree. Here they are rendered with jinja2 and StrictUndefined: a missing
variable is an error, never an empty string.

    pf = postfix_vars(cfg) | {...overrides...};  render_postfix(Path("/etc/postfix"), pf)
    dv = dovecot_vars(cfg) | {...};              render_dovecot(Path("/etc/dovecot"), dv)

Both render into a staging directory, validate there (``postfix -c DIR check`` plus ``postconf -n``
warnings; ``doveconf -c FILE -n``), and only then replace the live files, each atomically (write, fsync,
rename). A failed validation leaves the live configuration untouched and raises RenderError.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import jinja2

from sidecar.config import Config, sqlite_path
from sidecar.mta import aliasmap, commands
from sidecar.mta.commands import run_tty as run_tty  # moved to mta/commands.py; importable here too

# The repository (or installed share directory) that holds postfix/ and dovecot/.
_REPO_ROOT = Path(__file__).resolve().parents[2]
SHARE_DIR = Path("/usr/share/autoport")

POSTFIX_TEMPLATES = {"main.cf": "main.cf.j2", "master.cf": "master.cf.j2"}

# Postfix diagnostics worth failing on even when `postfix check` exits 0.
_POSTFIX_WARNING = re.compile(r"\b(warning|fatal|error):", re.IGNORECASE)


class RenderError(Exception):
    """A template could not be rendered, or the rendered configuration failed validation."""


def fragments_root() -> Path:
    """Where postfix/ and dovecot/ are: $AUTOPORT_FRAGMENTS, the source tree, or /usr/share/autoport."""
    env = os.environ.get("AUTOPORT_FRAGMENTS")
    if env:
        return Path(env)
    if (_REPO_ROOT / "postfix" / "main.cf.j2").exists():
        return _REPO_ROOT
    return SHARE_DIR


def _environment(root: Path) -> jinja2.Environment:
    # trim_blocks as Ansible's template module does, so `{% if %}` lines leave no blank line either way.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - config files, not HTML
    )


def render_template(name: str, variables: Mapping[str, object], *, root: Path | None = None) -> str:
    """One template (path relative to the fragments root) rendered with `variables`."""
    env = _environment(root or fragments_root())
    try:
        return env.get_template(name).render(**variables)
    except jinja2.UndefinedError as e:
        raise RenderError(f"{name}: {e.message}") from None
    except jinja2.TemplateError as e:
        raise RenderError(f"{name}: {e}") from None


def write_atomic(path: Path, data: str, mode: int = 0o644) -> None:
    """Replace `path` with `data`: write a temporary file beside it, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# --- Postfix ----------------------------------------------------------------------------------------------


def check_postfix(config_dir: Path) -> list[str]:
    """Validate a Postfix configuration directory; the warnings it printed. RenderError when it is broken.

    `postfix check` also creates missing queue directories with their proper owners and modes.
    """
    try:
        rc, out = commands.postfix_check(config_dir)
    except commands.CommandNotRun as e:
        raise RenderError(str(e)) from None
    if rc != 0:
        raise RenderError(f"postfix -c {config_dir} check failed ({rc}): {out.strip()[-2000:]}")
    warnings = [line for line in out.splitlines() if _POSTFIX_WARNING.search(line)]
    # postconf reports unknown or unused parameters (a typo in a name) that `postfix check` lets pass
    for flag in ("-n", "-M"):
        try:
            p = commands.postconf(config_dir, flag, check=False)
        except commands.CommandNotRun as e:
            raise RenderError(f"cannot run {e}") from None
        if p.returncode != 0:
            raise RenderError(f"postconf -c {config_dir} {flag} failed ({p.returncode}): {p.err.strip()[-2000:]}")
        warnings += [line for line in p.err.splitlines() if line.strip()]
    return warnings


def render_postfix(
    config_dir: Path, variables: Mapping[str, object], *, root: Path | None = None, validate: bool = True
) -> list[str]:
    """Render main.cf and master.cf into config_dir (validated first); the validation warnings."""
    texts = {
        dest: render_template(f"postfix/{src}", variables, root=root)
        for dest, src in POSTFIX_TEMPLATES.items()
    }
    warnings: list[str] = []
    if validate:
        config_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".autoport-staging-", dir=config_dir))
        try:
            past = time.time() - 10
            for dest, text in texts.items():
                write_atomic(staging / dest, text)
                # Postfix's commands sleep 300 ms per read of a main.cf/master.cf changed in the last 2 s (against
                # half-written files): `postfix check` of a fresh copy took 2 s longer. These copies are complete
                # and thrown away after the check, so they are dated back.
                os.utime(staging / dest, (past, past))
            warnings = check_postfix(staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    for dest, text in texts.items():
        write_atomic(config_dir / dest, text)
    save_variables(config_dir, variables)
    spec = str(variables.get("alias_maps") or "")
    if spec and not variables.get("autoport_finalized"):
        # an empty alias map until the sidecar's first write: Postfix's cleanup cannot open a missing one
        try:
            amap = aliasmap.AliasMap(spec, str(config_dir))
            if not amap.path.exists():
                amap.write(aliasmap.map_text([])[0])
        except aliasmap.AliasMapError as e:
            raise RenderError(f"alias_maps: {e}") from None
    return warnings


# --- Dovecot ----------------------------------------------------------------------------------------------


DOVECOT_SERIES = ("2.3", "2.4")


def dovecot_series(version: str | None = None) -> str:
    """The template set ("2.3" or "2.4") for a Dovecot version string, by default the installed one's
    (`dovecot --version`, e.g. "2.4.1-4 (7d8c0e5759)"); RenderError when it cannot be told."""
    if version is None:
        try:
            version = commands.run(["dovecot", "--version"], timeout=30, check=False).out.strip()
        except commands.CommandError as e:
            raise RenderError(f"cannot run `dovecot --version` to choose the Dovecot templates: {e}") from None
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise RenderError(f"cannot tell the Dovecot version from {version!r} (set [target] dovecot_version)")
    series = f"{m.group(1)}.{m.group(2)}"
    if series not in DOVECOT_SERIES:
        newer = (int(m.group(1)), int(m.group(2))) > (2, 4)
        if not newer:
            raise RenderError(f"Dovecot {version} is not supported (2.3 or 2.4)")
        series = "2.4"  # a later 2.x keeps 2.4's syntax until it says otherwise (dovecot_config_version)
    return series


def installed_series(configured: str = "") -> str:
    """dovecot_series(configured) when set; else the installed Dovecot's, "2.3" when none can be run (the
    templates are still rendered; `doveconf -n` then says what is wrong)."""
    if configured:
        return dovecot_series(configured)
    try:
        return dovecot_series()
    except RenderError:
        return "2.3"


def dovecot_templates(sql_driver: str, *, root: Path | None = None, series: str = "2.3") -> dict[str, str]:
    """Rendered file (relative to the Dovecot config dir) -> template (relative to the fragments root).

    series "2.3": dovecot/*.j2 (checkpassword passdb); "2.4": dovecot/2.4/*.j2 (Lua passdb, 2.4 syntax).
    """
    if sql_driver not in ("sqlite", "pgsql"):
        raise RenderError(f"sql_driver must be sqlite or pgsql, not {sql_driver!r}")
    if series == "2.4":
        base24 = (root or fragments_root()) / "dovecot" / "2.4"
        out24 = {
            "dovecot.conf": "dovecot/2.4/dovecot.conf.j2",
            # the driver and connection, included by conf.d/10-auth.conf
            "dovecot-sql-connect.conf.ext": f"dovecot/2.4/dovecot-sql-{sql_driver}.conf.ext.j2",
            # passdb step 3, asking the sidecar (2.4 has no checkpassword)
            "autoport-passdb.lua": "dovecot/2.4/autoport-passdb.lua.j2",
        }
        for t in sorted((base24 / "conf.d").glob("*.conf.j2")):
            out24[f"conf.d/{t.name.removesuffix('.j2')}"] = f"dovecot/2.4/conf.d/{t.name}"
        return out24
    if series != "2.3":
        raise RenderError(f"dovecot_series must be one of {', '.join(DOVECOT_SERIES)}, not {series!r}")
    base = (root or fragments_root()) / "dovecot"
    out = {
        "dovecot.conf": "dovecot/dovecot.conf.j2",
        "dovecot-sql.conf.ext": "dovecot/dovecot-sql.conf.ext.j2",
        "dovecot-sql-deny.conf.ext": "dovecot/dovecot-sql-deny.conf.ext.j2",
        # the driver and connection, included by both SQL files above
        "dovecot-sql-connect.conf.ext": f"dovecot/dovecot-sql-{sql_driver}.conf.ext.j2",
    }
    for t in sorted((base / "conf.d").glob("*.conf.j2")):
        out[f"conf.d/{t.name.removesuffix('.j2')}"] = f"dovecot/conf.d/{t.name}"
    return out


def check_dovecot(conf_file: Path) -> tuple[str, list[str]]:
    """`doveconf -c FILE -n`: (the effective non-default settings, warnings). RenderError when broken."""
    try:
        p = commands.doveconf(conf_file, "-n", check=False)
    except commands.CommandNotRun as e:
        raise RenderError(f"cannot run {e}") from None
    if p.returncode != 0:
        raise RenderError(f"doveconf -c {conf_file} -n failed ({p.returncode}): {p.err.strip()[-2000:]}")
    return p.out, [line for line in p.err.splitlines() if line.strip()]


def render_dovecot(
    config_dir: Path, variables: Mapping[str, object], *, root: Path | None = None, validate: bool = True
) -> list[str]:
    """Render dovecot.conf, conf.d/ and the SQL files into config_dir (validated first); the warnings.

    Files under config_dir/conf.d that no template produces are left alone but would be included too: render
    into a directory of our own.
    """
    driver = str(variables.get("sql_driver", ""))
    series = str(variables.get("dovecot_series") or "2.3")
    templates = dovecot_templates(driver, root=root, series=series)
    if series == "2.4":
        # 2.4 renamed disable_plaintext_auth to auth_allow_cleartext, inverted: always derived from the former
        variables = {**variables, "auth_allow_cleartext": allow_cleartext(variables.get("disable_plaintext_auth"))}
    texts = {dest: render_template(src, variables, root=root) for dest, src in templates.items()}
    # the SQL files may name a PostgreSQL passfile but never hold a secret; still, only Dovecot reads them
    modes = {dest: (0o640 if dest.endswith(".conf.ext") else 0o644) for dest in texts}
    warnings: list[str] = []
    if validate:
        config_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".autoport-staging-", dir=config_dir))
        try:
            for dest, text in texts.items():
                write_atomic(staging / dest, text, modes[dest])
            _, warnings = check_dovecot(staging / "dovecot.conf")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    for dest, text in texts.items():
        write_atomic(config_dir / dest, text, modes[dest])
        if dest.endswith(".conf.ext"):
            _chgrp(config_dir / dest, "dovecot")
    save_variables(config_dir, variables)
    return warnings


def allow_cleartext(disable_plaintext_auth: object) -> str:
    """Dovecot 2.4's auth_allow_cleartext for 2.3's disable_plaintext_auth ("no" -> "yes", else "no")."""
    return "yes" if str(disable_plaintext_auth) == "no" else "no"


VARIABLES_FILE = ".autoport-render.json"
# Variables added to the templates after a configuration may have been rendered and recorded: their values
# for such a record are what the templates did before (finalize renders a recorded configuration again).
# alias_maps: empty for a configuration rendered before the alias map file (its aliases stay on the socketmap)
ADDED_POSTFIX_VARIABLES = {
    "smtpd_sasl_auth_enable": "no",
    "smtps_listen": "",
    "message_size_limit": "10240000",
    "alias_maps": "",
}
ADDED_DOVECOT_VARIABLES = {
    "namespace_prefix": "",
    "namespace_separator": "/",
    "auth_cache_size": "0",
    "auth_cache_ttl": "3600",
    "auth_cache_negative_ttl": "3600",
}


def save_variables(config_dir: Path, variables: Mapping[str, object]) -> None:
    """Record the variables a configuration was rendered with (config_dir/.autoport-render.json, 0600), so
    `autoport finalize` can render the same files again with only the sidecar switched off. No secrets:
    the templates never receive any."""
    import json

    write_atomic(config_dir / VARIABLES_FILE, json.dumps(dict(variables), indent=1, sort_keys=True) + "\n", 0o600)


def load_variables(config_dir: Path) -> dict[str, object] | None:
    """The variables recorded by the last render into config_dir, or None when there is no record."""
    import json

    try:
        data = json.loads((config_dir / VARIABLES_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RenderError(f"{config_dir / VARIABLES_FILE}: unreadable: {e}") from None
    if not isinstance(data, dict):
        raise RenderError(f"{config_dir / VARIABLES_FILE}: not a JSON object")
    return data


def _chgrp(path: Path, group: str) -> None:
    # Dovecot's auth processes (dovecot user) read the SQL files; fine to skip when not root (tests as user)
    with contextlib.suppress(KeyError, PermissionError):
        shutil.chown(path, group=group)


# --- variables from the autoport configuration -------------------------------------------------------------


def pgsql_connect(url: str, *, passfile: str = "") -> str:
    """A libpq connection string (host=... dbname=... user=...) from a postgresql:// URL, without password."""
    return " ".join(f"{k}={_libpq_quote(v)}" for k, v in pgsql_params(url, passfile=passfile).items())


def pgsql_params(url: str, *, passfile: str = "") -> dict[str, str]:
    """The libpq parameters (host, port, dbname, user, ...) of a postgresql:// URL without password."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("postgresql", "postgres"):
        raise RenderError(f"not a postgresql:// URL: {url!r}")
    if u.password:
        raise RenderError("the store URL must not carry a password (use a passfile)")
    params: dict[str, str] = {}
    query = dict(urllib.parse.parse_qsl(u.query))
    host = urllib.parse.unquote(u.hostname or "") or query.pop("host", "")
    if host:
        params["host"] = host
    if u.port:
        params["port"] = str(u.port)
    dbname = urllib.parse.unquote(u.path.lstrip("/"))
    if dbname:
        params["dbname"] = dbname
    if u.username:
        params["user"] = urllib.parse.unquote(u.username)
    for key in ("port", "sslmode", "sslrootcert", "connect_timeout"):
        if key in query:
            params[key] = query[key]
    if passfile:
        params["passfile"] = passfile
    return params


def pgsql_parameters_block(url: str) -> str:
    """The lines of Dovecot 2.4's `pgsql NAME { parameters { ... } }` for a postgresql:// URL."""
    return "\n".join(f"    {k} = {_dovecot_quote(v)}" for k, v in pgsql_params(url).items())


def _dovecot_quote(value: str) -> str:
    if value and not re.search(r'[\s"\\#{}$%]', value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _libpq_quote(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def postfix_socketmap(value: str) -> str:
    """Postfix notation of the sidecar's socketmap endpoint: unix:/PATH or inet:HOST:PORT."""
    if value.startswith(("unix:", "inet:")):
        return value
    if value.startswith("/"):
        return f"unix:{value}"
    return f"inet:{value}"


def legacy_smtp_tls(cfg: Config) -> tuple[str, str]:
    """(smtp_tls_security_level, smtp_tls_wrappermode) of the legacy relay transport."""
    lg = cfg.legacy
    if lg.smtp_tls == "none":
        return "none", "no"
    level = "secure" if lg.tls_verify else "encrypt"
    return level, ("yes" if lg.smtp_tls == "implicit" else "no")


def world_executable(path: str | os.PathLike[str]) -> bool:
    """Whether any user (Dovecot's auth process runs as `dovecot`) can execute `path`: the file after all
    symlinks has o+x and every directory above it o+x. os.access cannot tell: it answers for root."""
    real = Path(os.path.realpath(path))
    try:
        if not real.is_file() or not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


def shim_interpreter() -> str:
    """A Python the dovecot user may run: ours, else the system's (the shim needs no site-packages).

    A virtualenv's python is often a symlink into a private directory (pyenv under /root): Dovecot then
    fails with "execv(...) failed: Permission denied" and every pass-through login is a temporary failure.
    """
    for candidate in (sys.executable, "/usr/bin/python3"):
        if candidate and world_executable(candidate):
            return candidate
    raise RenderError(
        f"no Python interpreter the dovecot user can execute ({sys.executable} resolves to "
        f"{os.path.realpath(sys.executable)}; /usr/bin/python3 missing)"
    )


def checkpassword_command(auth_socket: str) -> str:
    """Dovecot's checkpassword `args`: the shim run as a file under `python -I -S` (cheapest start).

    Dovecot splits args on spaces, so none of the paths may contain one; Dovecot appends the path of its
    checkpassword-reply program.
    """
    shim = Path(__file__).resolve().parents[1] / "edge" / "checkpassword.py"
    cmd = f"{shim_interpreter()} -I -S {shim} --socket {auth_socket}"
    if len(cmd.split()) != 6:
        raise RenderError(f"checkpassword command must not contain spaces inside paths: {cmd!r}")
    return cmd


@functools.cache
def default_map_type() -> str:
    """Postfix's default_database_type (hash on Debian; lmdb where Berkeley DB is gone); hash if it cannot say."""
    try:
        value = commands.postconf("", "-d", "-h", "default_database_type", timeout=30).out.strip()
    except (commands.CommandNotRun, commands.CommandFailed):
        return "hash"
    return value if value in aliasmap.INDEXED else "hash"


def postfix_vars(cfg: Config, *, myhostname: str = "localhost") -> dict[str, str]:
    """Production variables for postfix/*.j2 from the autoport configuration (Debian paths)."""
    level, wrapper = legacy_smtp_tls(cfg)
    lg = cfg.legacy
    return {
        "myhostname": myhostname,
        "queue_directory": "/var/spool/postfix",
        "data_directory": "/var/lib/postfix",
        "inet_interfaces": "all",
        "inet_protocols": "all",
        "smtp_bind_address": "",
        "mynetworks": "127.0.0.0/8 [::1]/128",
        "smtpd_peername_lookup": "yes",
        "virtual_mailbox_domains": " ".join(cfg.mail.domains),
        "virtual_transport": f"{cfg.target.legacy_transport}:[{lg.host}]:{lg.smtp_port}",
        "recipient_delimiter": "+",
        "relayhost": "",
        "socketmap": postfix_socketmap(cfg.sockets.socketmap),
        "milter": cfg.sockets.milter,
        "legacy_concurrency": str(max(1, cfg.limits.legacy_connections)),
        "sasl_path": "private/auth",
        "sasl_relay": cfg.sockets.sasl,  # empty: smtpd talks to Dovecot's socket directly
        "smtpd_tls_auth_only": "no" if cfg.target.plaintext_auth else "yes",
        # what the legacy server offered (sidecar/legacy/offer.py): SMTP AUTH on 25, 465, the size limit
        "smtpd_sasl_auth_enable": "yes" if cfg.target.smtp_auth_on_25 else "no",
        "smtps_listen": "smtps" if cfg.target.smtps else "",
        "message_size_limit": str(cfg.target.message_size_limit),
        "smtpd_tls_security_level": "may",
        "submission_tls_security_level": "encrypt",
        "tls_cert_file": "",
        "tls_key_file": "",
        "maillog_file": "",
        "maillog_file_prefixes": "/var, /dev/stdout",
        "syslog_name": "postfix",
        "smtp_listen": "smtp",
        "submission_listen": "submission",
        "legacy_tls_security_level": level,
        "legacy_tls_wrappermode": wrapper,
        "legacy_tls_ca_file": lg.ca_file,
        "legacy_tls_server_name": lg.tls_server_name,
        # aliases: a map file the sidecar writes from the store (sidecar/mta/aliasmap.py), Postfix's default type
        "alias_maps": aliasmap.default_spec(default_map_type()),
        # `autoport finalize` (sidecar/ops/finalize.py) renders again with "yes" here and writes these two maps
        "autoport_finalized": "",
        "final_mailbox_maps": f"texthash:{cfg.target.postfix_config or '/etc/postfix'}/autoport-mailboxes",
        "final_alias_maps": f"texthash:{cfg.target.postfix_config or '/etc/postfix'}/autoport-aliases",
    }


def dovecot_listener(path: str, base_dir: str) -> str:
    """A unix_listener name for `path`: relative when inside base_dir (doveconf warns about the prefix)."""
    prefix = base_dir.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


def lmtp_socket_path(local_transport: str, queue_directory: str) -> str:
    """Where Dovecot must listen for Postfix's `lmtp:unix:PATH` (PATH relative to the queue directory)."""
    prefix = "lmtp:unix:"
    if not local_transport.startswith(prefix):
        raise RenderError(f"target.local_transport must be lmtp:unix:PATH, not {local_transport!r}")
    path = local_transport[len(prefix) :]
    return path if path.startswith("/") else f"{queue_directory.rstrip('/')}/{path}"


def dovecot_vars(
    cfg: Config, *, queue_directory: str = "/var/spool/postfix", legacy_namespace: tuple[str, str] | None = None
) -> dict[str, str]:
    """Production variables for dovecot/*.j2 from the autoport configuration (Debian paths).

    legacy_namespace: the legacy server's (prefix, separator) when known (sidecar.legacy.namespace.probe), for
    [mail] namespace_* = "auto".
    """
    from sidecar.legacy.namespace import resolve

    ns = resolve(cfg, legacy_namespace)
    url = cfg.store.url
    if url.startswith("sqlite:///"):
        driver, sqlite_file, pg = "sqlite", sqlite_path(url), ""
    else:
        driver, sqlite_file, pg = "pgsql", "", pgsql_connect(url)
    dovecot_dir = str(Path(cfg.target.dovecot_config).parent) if cfg.target.dovecot_config else "/etc/dovecot"
    base_dir = "/run/dovecot"
    return {
        "listen": "*, ::",
        "base_dir": base_dir,
        "instance_name": "dovecot",
        "state_dir": "/var/lib/dovecot",
        "dovecot_dir": dovecot_dir,
        "auth_default_realm": "",
        "disable_plaintext_auth": "no" if cfg.target.plaintext_auth else "yes",
        "checkpassword_args": checkpassword_command(cfg.sockets.auth),
        "mail_root": cfg.target.mail_root,
        "mail_user": cfg.target.mail_user,
        "mail_group": cfg.target.mail_user,
        "recipient_delimiter": "+",
        # the IMAP namespace clients see (sidecar/legacy/namespace.py); on disk Maildir++ either way
        "namespace_prefix": ns.prefix,
        "namespace_separator": ns.separator,
        "log_path": "syslog",
        "ssl": "required",
        "ssl_cert": "/etc/dovecot/private/dovecot.pem",
        "ssl_key": "/etc/dovecot/private/dovecot.key",
        "ssl_client_ca_file": cfg.legacy.ca_file,
        "imap_port": "143",
        "imaps_port": "993",
        "pop3_port": "110",
        "pop3s_port": "995",
        "managesieve_port": "4190",
        "lmtp_socket": lmtp_socket_path(cfg.target.local_transport, queue_directory),
        "auth_socket": f"{queue_directory.rstrip('/')}/private/auth",
        "sasl_relay_upstream": dovecot_listener(cfg.sockets.dovecot_auth, base_dir) if cfg.sockets.sasl else "",
        "postfix_user": "postfix",
        "postfix_group": "postfix",
        "login_trusted_networks": "",
        "sql_driver": driver,
        "sqlite_path": sqlite_file,
        "pgsql_connect": pg,
        "autoport_finalized": "",  # "yes" after `autoport finalize`: the store's sql passdb only
        # Dovecot 2.4 (dovecot/2.4/): chosen from `dovecot --version` unless [target] dovecot_version says
        "dovecot_series": installed_series(cfg.target.dovecot_version),
        "auth_allow_cleartext": allow_cleartext("yes"),  # derived from disable_plaintext_auth when rendering
        "auth_socket_path": cfg.sockets.auth,  # the Lua passdb asks the sidecar here
        "auth_timeout": "30",
        "pgsql_parameters": pgsql_parameters_block(url) if driver == "pgsql" else "",
    } | auth_cache_vars(cfg)


def auth_cache_vars(cfg: Config) -> dict[str, str]:
    """Dovecot's auth cache settings from [target] auth_cache_* (the sql passdb steps; finalize keeps them)."""
    t = cfg.target
    return {
        "auth_cache_size": t.auth_cache_size,
        "auth_cache_ttl": str(t.auth_cache_ttl),
        "auth_cache_negative_ttl": str(t.auth_cache_negative_ttl),
    }
