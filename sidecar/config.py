"""The configuration: one TOML file, one schema, a default and a comment per key.

Unknown keys and wrong types are errors naming the key and the file (ConfigError). `autoport config` prints
the effective configuration with secrets redacted (render()).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PATH = "/etc/autoport/autoport.toml"
MAX_FILE_BYTES = 1 << 20  # a configuration is a few KiB; anything near this is a mistake (or an attack)
MAX_INT = 2**63 - 1  # what the store and C-level calls can hold
REDACTED = "********"


def unix_path(address: str) -> str:
    """The path of a `unix:/PATH` or `/PATH` listener in Postfix's notation ("" for inet:HOST:PORT)."""
    if address.startswith("unix:"):
        return address[len("unix:") :]
    return address if address.startswith("/") else ""


class ConfigError(Exception):
    """A configuration mistake; the message names the file and the key."""


def _f(default: Any, doc: str, *, secret: bool = False, choices: tuple[str, ...] = ()) -> Any:
    if isinstance(default, list):
        items: list[Any] = list(default)
        return field(
            default_factory=items.copy,
            metadata={"doc": doc, "secret": secret, "choices": choices},
        )
    return field(default=default, metadata={"doc": doc, "secret": secret, "choices": choices})


@dataclass
class LegacyConfig:
    """The legacy server, at its new address."""

    host: str = _f("127.0.0.1", "address or name of the legacy server (its NEW address after the switch)")
    imap_port: int = _f(143, "IMAP port on the legacy server (0: no IMAP)")
    imap_tls: str = _f("starttls", "TLS toward legacy IMAP", choices=("none", "starttls", "implicit"))
    pop3_port: int = _f(110, "POP3 port on the legacy server (0: no POP3)")
    pop3_tls: str = _f("starttls", "TLS toward legacy POP3", choices=("none", "starttls", "implicit"))
    smtp_port: int = _f(25, "SMTP port the legacy server receives mail on (relay target)")
    smtp_tls: str = _f("starttls", "TLS toward legacy SMTP", choices=("none", "starttls", "implicit"))
    submission_port: int = _f(587, "SMTP AUTH port on the legacy server, used to verify passwords (0: none)")
    submission_tls: str = _f(
        "starttls", "TLS toward legacy SMTP AUTH", choices=("none", "starttls", "implicit")
    )
    smtps_port: int = _f(
        465, "SMTP AUTH port with implicit TLS on the legacy server (0: none); doctor checks the target offers it too"
    )
    sieve_port: int = _f(4190, "ManageSieve port on the legacy server (0: none)")
    sieve_tls: str = _f("starttls", "TLS toward legacy ManageSieve", choices=("none", "starttls", "implicit"))
    tls_verify: bool = _f(True, "verify the legacy server's certificate whenever TLS is used")
    tls_server_name: str = _f("", "name expected in the legacy certificate (empty: host)")
    ca_file: str = _f("", "CA bundle for the legacy certificate (empty: system store)")
    verify_with: list[str] = _f(
        ["imap", "pop3", "smtp"], "protocols that verify passwords, tried in this order (imap, pop3, smtp)"
    )
    timeout: float = _f(10.0, "seconds for any single exchange with the legacy server")
    admin_user: str = _f("", "legacy admin/master login for bulk migration (empty: none)")
    admin_password: str = _f("", "password of admin_user", secret=True)
    admin_mode: str = _f(
        "authzid",
        "how the admin logs in as a user: authzid (SASL PLAIN authorization id) or master (user*admin)",
        choices=("authzid", "master"),
    )
    master_separator: str = _f(
        "*",
        "separator for admin_mode = master (Dovecot's auth_master_user_separator); logins containing it are refused",
    )
    login_template: str = _f(
        "%u",
        "the login the legacy server is asked for an account: %u its login (imported by import-users, else its "
        "address), %n the part of %u before @, %d the account's domain, %% a percent sign; e.g. %n, %n@%d, "
        "CORP\\%n",
    )
    send_client_ip: bool = _f(True, "pass the client address on (IMAP ID x-originating-ip, SMTP XCLIENT)")
    ready_connections: int = _f(
        2, "connections kept ready (connected, TLS done, not logged in) for password checks while logins come in"
    )
    ready_max_age: float = _f(20.0, "seconds a ready connection is kept unused before it is closed")


@dataclass
class MailConfig:
    """Mail domains and how login names map to accounts."""

    domains: list[str] = _f([], "mail domains served (and migrated) by this host")
    default_domain: str = _f("", "domain added to bare login names (empty: the first of domains)")
    realms: list[str] = _f(
        [],
        "realms stripped from logins: REALM\\user and user@REALM become user (then the login map or "
        "default_domain); other realms and foreign domains are refused",
    )
    strip_realm: bool = _f(False, "ignored (kept so old files load): list the realms to strip in realms")
    lowercase: bool = _f(True, "fold login names and addresses to lower case")
    namespace_prefix: str = _f(
        "auto",
        "prefix of the target's personal IMAP namespace, e.g. \"INBOX.\" (auto: the legacy server's NAMESPACE, "
        "resolved when Dovecot's configuration is rendered; see docs/design.md)",
    )
    namespace_separator: str = _f(
        "auto", "hierarchy separator of the target's IMAP namespace: / or . (auto: the legacy server's)"
    )


@dataclass
class StoreConfig:
    """The state store."""

    url: str = _f(
        "sqlite:////var/lib/autoport/state.db",
        "sqlite:///ABSOLUTE/PATH or postgresql://user@host/db (password via PGPASSFILE, not here)",
    )
    dovecot_group: str = _f("dovecot", "group that may read a SQLite store (Dovecot's sql passdb/userdb)")
    dovecot_role: str = _f("", "PostgreSQL role granted SELECT on the dovecot_* views (empty: none)")


@dataclass
class SocketsConfig:
    """Where the sidecar listens (UNIX sockets unless noted)."""

    auth: str = _f("/run/autoport/auth.sock", "socket autoport-checkpassword talks to")
    socketmap: str = _f("/run/autoport/socketmap.sock", "Postfix socketmap (transport, verify maps)")
    socketmap_workers: int = _f(
        2,
        "processes answering the socketmap (forked by the daemon, restarted if they die; 0: answer in the "
        "daemon's own event loop, ~2x slower, bench/results/routing.md)",
    )
    milter: str = _f(
        "unix:/run/autoport/milter.sock",
        "milter listener, in Postfix's notation (unix:/PATH; inet:HOST:PORT works but costs Postfix 2x "
        "throughput on loopback TCP, bench/results/routing.md)",
    )
    sasl: str = _f(
        "/run/autoport/sasl.sock",
        "Postfix's SMTP AUTH socket (smtpd_sasl_path): relays to Dovecot's auth and turns its temporary failures "
        "into 454 (empty: Postfix talks to Dovecot directly)",
    )
    dovecot_auth: str = _f("/run/dovecot/autoport-auth", "Dovecot's auth-client socket the SASL relay forwards to")
    auth_group: str = _f("dovecot", "group given the auth socket (autoport-checkpassword runs as Dovecot's user)")
    postfix_group: str = _f("postfix", "group given the socketmap (and a unix: milter) socket (Postfix's daemons)")
    mode: int = _f(0o660, "permission bits of the sockets (0660: owner and the group above)")


@dataclass
class TargetConfig:
    """The new host: Postfix + Dovecot."""

    mail_root: str = _f("/var/vmail", "Maildir root: mailboxes live in MAIL_ROOT/DOMAIN/LOCALPART/Maildir")
    mail_uid: int = _f(0, "uid owning mail files (0: look up mail_user)")
    mail_gid: int = _f(0, "gid owning mail files (0: look up mail_user)")
    mail_user: str = _f("vmail", "user owning mail files when mail_uid is 0")
    local_transport: str = _f("lmtp:unix:private/dovecot-lmtp", "Postfix transport for migrated accounts")
    legacy_transport: str = _f("legacy", "master.cf transport name that relays to the legacy server")
    doveadm: str = _f("doveadm", "doveadm executable (kick proxied sessions, warm indexes)")
    dovecot_config: str = _f("", "dovecot.conf of the target (empty: Dovecot's default)")
    postfix_config: str = _f("", "Postfix config directory of the target (empty: /etc/postfix)")
    # what the target offers clients: no less than the legacy server did (`autoport doctor` says what to set)
    smtps: bool = _f(False, "offer SMTP AUTH with implicit TLS on port 465 (submissions), as the legacy server did")
    smtp_auth_on_25: bool = _f(False, "offer SMTP AUTH on port 25 too, where the legacy server allowed it")
    plaintext_auth: bool = _f(
        False, "allow logins without TLS (IMAP, POP3, SMTP AUTH): only where the legacy server allowed them"
    )
    message_size_limit: int = _f(
        10240000, "largest message Postfix accepts, bytes (0: no limit); no smaller than the legacy server's SIZE"
    )
    dovecot_version: str = _f(
        "", "Dovecot version whose configuration syntax to render, 2.3 or 2.4 (empty: `dovecot --version`)"
    )
    # Dovecot's auth cache for the store's sql passdb steps (never the step that asks the sidecar): autoport
    # flushes an account's entry on every node at each change (docs/modules.md, "Dovecot's auth cache")
    auth_cache_size: str = _f("10M", "Dovecot auth_cache_size for the sql passdb steps (0: no auth cache)")
    auth_cache_ttl: int = _f(3600, "seconds Dovecot keeps a cached passdb/userdb answer (auth_cache_ttl)")
    auth_cache_negative_ttl: int = _f(
        300, "seconds Dovecot keeps a cached unknown user or wrong password (auth_cache_negative_ttl; 0: none)"
    )


@dataclass
class HashConfig:
    """How verified passwords are stored (Dovecot-compatible)."""

    scheme: str = _f("ARGON2ID", "password scheme", choices=("ARGON2ID", "SHA512-CRYPT", "BLF-CRYPT"))
    argon2_memory_kib: int = _f(19456, "argon2 memory cost in KiB (login cost: docs/design.md, Measured numbers)")
    argon2_time_cost: int = _f(2, "argon2 iterations")
    argon2_parallelism: int = _f(1, "argon2 lanes")
    sha512_rounds: int = _f(5000, "rounds for SHA512-CRYPT")


@dataclass
class LimitsConfig:
    """Concurrency and rate limits."""

    copy_concurrency: int = _f(4, "copy jobs running at once on this node (0: this node runs no copies)")
    copy_connections: int = _f(
        1,
        "IMAP sessions one copy may open toward the legacy server, its folders copied in parallel; the extra ones "
        "only while legacy_connections has room. Mind the legacy server's own caps per user or client address "
        "(Courier MAXPERIP, Dovecot mail_max_userip_connections): the users' proxied sessions count there too",
    )
    legacy_connections: int = _f(
        8,
        "connections this node opens to the legacy server at once: the sidecar's (password checks and the ones "
        "kept ready for them, copies, sweeps, Sieve) and, counted apart, Postfix's relay (0: no cap on the "
        "sidecar's; the relay gets 1)",
    )
    legacy_login_connections: int = _f(
        0, "of legacy_connections, kept for password checks: copies never use them (0: half of legacy_connections)"
    )
    legacy_bytes_per_second: int = _f(
        0, "bytes per second the copier may read from the legacy server, all copies of this node together (0: no cap)"
    )
    throttle_hours: str = _f(
        "", "local hours when legacy_bytes_per_second applies, e.g. \"08-18\" (\"22-06\" wraps; empty: always)"
    )
    auth_concurrency: int = _f(16, "password checks in flight toward the legacy server at once")
    auth_failures_per_account: int = _f(
        5, "wrong passwords per account and client address per window before refusing locally (FAIL)"
    )
    auth_failures_per_account_total: int = _f(
        50,
        "wrong passwords per account from all clients per window before answering TEMP (never FAIL: guesses from "
        "elsewhere must not make the user's right password look wrong)",
    )
    auth_failures_per_client: int = _f(20, "wrong passwords per client address per window")
    auth_failure_window: float = _f(600.0, "seconds over which failures are counted")
    negative_cache_ttl: float = _f(60.0, "seconds a failed (user, password) is answered locally")
    copy_attempts: int = _f(5, "attempts before an account is marked failed")
    lease_seconds: float = _f(60.0, "copy job lease; a crashed node's job is taken over after it")
    sweep_interval: float = _f(300.0, "seconds between trailing sweeps of a migrated account's legacy mailbox")
    sweep_window: float = _f(0.0, "seconds after migration that sweeps go on (0: until finalize)")
    cutover_grace: float = _f(
        10.0,
        "seconds between the first and the verifying second kick of a cutover, before the final delta: at least "
        "the time a login answered just before cutover needs to reach the legacy server ([legacy] timeout)",
    )
    kick_timeout: float = _f(30.0, "seconds every live node has to confirm a cutover kick; else back to legacy")
    node_timeout: float = _f(15.0, "a node whose heartbeat is older than this is not waited for at cutover")


@dataclass
class LogConfig:
    """Logging."""

    destination: str = _f("stderr", "stderr, syslog, or file:/ABSOLUTE/PATH")
    level: str = _f("info", "log level", choices=("debug", "info", "warning", "error"))


@dataclass
class DashboardConfig:
    """Web dashboard and Prometheus metrics."""

    listen: str = _f("127.0.0.1:8025", "host:port of the dashboard and /metrics (empty: off)")
    token: str = _f("", "bearer token or password required for the dashboard (empty: refuse all)", secret=True)


@dataclass
class LdapConfig:
    """A directory listing the mail accounts (OpenLDAP, Active Directory): `autoport inventory --from ldap`."""

    url: str = _f("", "ldap://HOST[:PORT] or ldaps://HOST[:PORT] (empty: no directory)")
    starttls: bool = _f(True, "StartTLS on an ldap:// URL before binding (ldaps:// is TLS from the start)")
    tls_verify: bool = _f(True, "verify the directory's certificate")
    ca_file: str = _f("", "CA bundle for the directory's certificate (empty: system store)")
    tls_server_name: str = _f("", "name expected in the directory's certificate (empty: the URL's host)")
    bind_dn: str = _f("", "DN to bind as (AD: also user@domain); empty: anonymous bind")
    bind_password: str = _f("", "password of bind_dn", secret=True)
    base_dn: str = _f("", "where to search, e.g. ou=people,dc=example,dc=org")
    filter: str = _f(
        "(mail=*)",
        "entries that are mail accounts (AD: (&(objectCategory=person)(objectClass=user)(mail=*)"
        "(!(userAccountControl:1.2.840.113556.1.4.803:=2))) leaves out disabled accounts)",
    )
    mail_attribute: str = _f("mail", "attribute holding the account's address")
    timeout: float = _f(10.0, "seconds for connecting and for each LDAP operation")
    page_size: int = _f(500, "entries per page of the search (AD returns at most 1000 without paging)")


@dataclass
class Config:
    legacy: LegacyConfig = field(default_factory=LegacyConfig)
    mail: MailConfig = field(default_factory=MailConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    sockets: SocketsConfig = field(default_factory=SocketsConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    hash: HashConfig = field(default_factory=HashConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    ldap: LdapConfig = field(default_factory=LdapConfig)
    # where this configuration was read from ("" for defaults)
    path: str = field(default="", metadata={"internal": True})

    def default_domain(self) -> str:
        return self.mail.default_domain or (self.mail.domains[0] if self.mail.domains else "")


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if not f.metadata.get("internal")
}


def _check_value(path: str, key: str, hint: Any, value: Any, choices: tuple[str, ...]) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{path}: key '{key}' must be {expected}, not {type(value).__name__} {value!r}")

    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        if value < 0:
            raise ConfigError(f"{path}: key '{key}' must not be negative, not {value}")
        if value > (65535 if key.endswith("_port") else MAX_INT):
            raise ConfigError(f"{path}: key '{key}' is too large: {value}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        if value < 0:
            raise ConfigError(f"{path}: key '{key}' must not be negative, not {value}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: key '{key}' must be a finite number, not {value}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        if "\x00" in value or "\n" in value:
            raise ConfigError(f"{path}: key '{key}' must not contain NUL or newline")
        if choices and value not in choices:
            raise ConfigError(f"{path}: key '{key}' must be one of {', '.join(choices)}, not {value!r}")
    elif typing.get_origin(hint) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
    else:  # pragma: no cover - schema bug
        raise TypeError(f"unsupported type {hint} for {key}")
    return value


def from_dict(data: dict[str, Any], path: str = "<config>") -> Config:
    """Build a Config from parsed TOML, rejecting unknown keys and wrong types."""
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"{path}: unknown section or key '{name}' (known: {', '.join(SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: '{name}' must be a table ([{name}])")
        cls = SECTIONS[name]
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, v in value.items():
            dotted = f"{name}.{key}"
            if key not in known:
                raise ConfigError(f"{path}: unknown key '{dotted}'")
            kwargs[key] = _check_value(path, dotted, hints[key], v, known[key].metadata.get("choices", ()))
        sections[name] = cls(**kwargs)
    cfg = Config(**sections, path=path)
    _check_semantics(cfg, path)
    return cfg


def _check_semantics(cfg: Config, path: str) -> None:
    for proto in cfg.legacy.verify_with:
        if proto not in ("imap", "pop3", "smtp"):
            raise ConfigError(f"{path}: key 'legacy.verify_with' has unknown protocol {proto!r}")
    url = cfg.store.url
    if not (url.startswith("sqlite:///") or url.startswith(("postgresql://", "postgres://"))):
        raise ConfigError(f"{path}: key 'store.url' must start with sqlite:/// or postgresql://, not {url!r}")
    if url.startswith(("postgresql://", "postgres://")) and _url_has_password(url):
        raise ConfigError(
            f"{path}: key 'store.url' must not carry a password; use PGPASSFILE or a UNIX socket peer login"
        )
    dest = cfg.log.destination
    if dest not in ("stderr", "syslog") and not (dest.startswith("file:/")):
        raise ConfigError(f"{path}: key 'log.destination' must be stderr, syslog or file:/PATH, not {dest!r}")
    if cfg.ldap.url and not cfg.ldap.url.startswith(("ldap://", "ldaps://")):
        raise ConfigError(f"{path}: key 'ldap.url' must start with ldap:// or ldaps://, not {cfg.ldap.url!r}")
    sep, prefix = cfg.mail.namespace_separator, cfg.mail.namespace_prefix
    if sep not in ("auto", "/", "."):
        raise ConfigError(f"{path}: key 'mail.namespace_separator' must be auto, / or ., not {sep!r}")
    if prefix != "auto" and prefix and (sep == "auto" or not prefix.endswith(sep) or prefix == sep):
        raise ConfigError(
            f"{path}: key 'mail.namespace_prefix' {prefix!r} must be empty or end with namespace_separator "
            f"(given explicitly), e.g. \"INBOX.\" with \".\""
        )
    if not 0 <= cfg.sockets.socketmap_workers <= 64:
        raise ConfigError(f"{path}: key 'sockets.socketmap_workers' must be 0..64, not {cfg.sockets.socketmap_workers}")
    for d in cfg.mail.domains:
        if not d or "@" in d or " " in d:
            raise ConfigError(f"{path}: key 'mail.domains' has an invalid domain {d!r}")
    for r in cfg.mail.realms:
        if not r or "@" in r or "\\" in r or any(c.isspace() for c in r):
            raise ConfigError(f"{path}: key 'mail.realms' has an invalid realm {r!r}")
    lim = cfg.limits
    if not 1 <= lim.copy_connections <= 16:
        raise ConfigError(f"{path}: key 'limits.copy_connections' must be 1..16, not {lim.copy_connections}")
    if lim.legacy_login_connections and not lim.legacy_connections:
        raise ConfigError(
            f"{path}: key 'limits.legacy_login_connections' needs limits.legacy_connections (0 there: no cap, "
            "nothing to keep for logins)"
        )
    if lim.legacy_login_connections >= max(1, lim.legacy_connections):
        raise ConfigError(
            f"{path}: key 'limits.legacy_login_connections' ({lim.legacy_login_connections}) must be less than "
            f"limits.legacy_connections ({lim.legacy_connections}): copies need at least one connection"
        )
    from sidecar.legacy.limit import parse_hours

    try:
        parse_hours(lim.throttle_hours)
    except ValueError as e:
        raise ConfigError(f"{path}: key 'limits.throttle_hours' {e}") from None
    size = cfg.target.auth_cache_size
    if not re.fullmatch(r"\d+[kKmMgG]?", size):
        raise ConfigError(f"{path}: key 'target.auth_cache_size' must be a size like 10M, 512k or 0, not {size!r}")
    for key in ("auth_cache_ttl", "auth_cache_negative_ttl"):
        if getattr(cfg.target, key) < 0:
            raise ConfigError(f"{path}: key 'target.{key}' must be 0 or more seconds")
    try:
        from sidecar.auth.logins import InvalidLogin, legacy_login

        legacy_login(cfg.legacy.login_template, "user@example.org", "user@example.org")
    except InvalidLogin as e:
        raise ConfigError(f"{path}: key 'legacy.login_template': {e}") from None


def _url_has_password(url: str) -> bool:
    rest = url.split("://", 1)[1]
    userinfo = rest.split("@", 1)[0] if "@" in rest.split("/", 1)[0] else ""
    return ":" in userinfo


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a configuration file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_FILE_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: TOML syntax error: {e}") from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise ConfigError(f"{p}: TOML nested too deeply") from None
    return from_dict(data, str(p))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def render(cfg: Config, *, redact: bool = True) -> str:
    """The effective configuration as commented TOML; secrets redacted unless redact=False."""
    out = [f"# effective autoport configuration (from {cfg.path or 'defaults'})"]
    for name, cls in SECTIONS.items():
        section = getattr(cfg, name)
        out.append("")
        out.append(f"[{name}]  # {(cls.__doc__ or '').strip()}")
        for f in dataclasses.fields(cls):
            value = getattr(section, f.name)
            if redact and f.metadata.get("secret") and value:
                value = REDACTED
            out.append(f"# {f.metadata['doc']}")
            out.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(out) + "\n"


def as_dict(cfg: Config, *, redact: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        section = getattr(cfg, name)
        d: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = getattr(section, f.name)
            if redact and f.metadata.get("secret") and value:
                value = REDACTED
            d[f.name] = value
        out[name] = d
    return out


def secrets(cfg: Config) -> list[str]:
    """All secret values in the configuration (for the log redactor)."""
    found = []
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.metadata.get("secret"):
                value = getattr(getattr(cfg, name), f.name)
                if value:
                    found.append(value)
    return found


def sqlite_path(url: str) -> str:
    """The file path of a sqlite:///PATH store URL."""
    assert url.startswith("sqlite:///")
    return "/" + url[len("sqlite:///") :].lstrip("/")

