"""The lab's target stack: stock Postfix + Dovecot configured from postfix/ and dovecot/, plus the sidecar.

More (the reasons and limits behind this module): docs/modules.md, sidecar/lab/target.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sidecar import config
from sidecar.lab import proc, tlsgen
from sidecar.lab.legacy import make_traversable
from sidecar.lab.proc import LabError
from sidecar.mta import aliasmap, render

DOVECOT = "target-dovecot"
POSTFIX = "target-postfix"
SIDECAR = "sidecar"
COMPONENTS = (SIDECAR, DOVECOT, POSTFIX)  # start order; stopped in reverse
STATE_KEY = "target"
TLS_NAME = "target.lab.test"
CONFIG_NAME = "autoport.toml"


@dataclasses.dataclass
class TargetStack:
    host: str
    imap: int
    pop3: int
    smtp: int
    submission: int
    managesieve: int
    socketmap: str  # Postfix notation: unix:PATH or inet:HOST:PORT
    dashboard: int | None  # the sidecar's dashboard port on `host` (token: [dashboard] in autoport.toml)
    dir: Path  # lab_dir
    config: Path  # autoport.toml, the sidecar's configuration
    dovecot_config: Path  # dovecot.conf
    postfix_config: Path  # Postfix config directory
    queue_directory: Path
    mail_root: Path
    auth_socket: Path  # the sidecar's, for autoport-checkpassword
    milter: str  # Postfix notation
    store_url: str
    ca_file: Path  # the lab CA that signed TLS_NAME
    sidecar: bool  # whether start_target runs the sidecar
    logs: dict[str, Path]
    pids: dict[str, int | None]
    smtps: int = 0  # SMTP AUTH with implicit TLS ([target] smtps; 465 in production), 0: not offered
    sysroot: str = ""  # a Debian 13 root (sidecar.lab.debroot) whose Dovecot 2.4 / Postfix 3.10 run the stack

    def to_json(self) -> dict[str, Any]:
        """What clients of the lab need: addresses and ports (the demo prints this)."""
        return {
            "host": self.host,
            "imap": self.imap,
            "pop3": self.pop3,
            "smtp": self.smtp,
            "submission": self.submission,
            "smtps": self.smtps,
            "managesieve": self.managesieve,
            "socketmap": self.socketmap,
            "dashboard": self.dashboard,
        }

    def to_state(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        d["logs"] = {k: str(v) for k, v in self.logs.items()}
        return d

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> TargetStack:
        paths = {f.name for f in dataclasses.fields(cls) if f.type in ("Path", Path)}
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {k: (Path(v) if k in paths else v) for k, v in d.items() if k in names}
        kw["logs"] = {k: Path(v) for k, v in d.get("logs", {}).items()}
        return cls(**kw)


def load_target(lab_dir: Path) -> TargetStack | None:
    """The target stack recorded in lab_dir/lab-state.json, or None."""
    data = proc.load_state(lab_dir.resolve()).get(STATE_KEY)
    return TargetStack.from_state(data) if data else None


def _save(lab_dir: Path, stack: TargetStack) -> None:
    state = proc.load_state(lab_dir)
    state[STATE_KEY] = stack.to_state()
    proc.save_state(lab_dir, state)



def _mkdir(path: Path, mode: int = 0o755, owner: str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    if owner:
        shutil.chown(path, user=owner, group=owner)
    return path


def start_target(
    lab_dir: Path,
    *,
    host: str = "127.0.0.3",
    domains: Iterable[str] = ("example.test",),
    legacy: Mapping[str, Any] | None = None,
    store_url: str | None = None,
    sidecar: bool = True,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    postfix_overrides: Mapping[str, str] | None = None,
    dovecot_overrides: Mapping[str, str] | None = None,
    namespace_login: tuple[str, str] | None = None,
    sysroot: Path | None = None,
) -> TargetStack:
    """Render the target's configuration into lab_dir, start the sidecar (optional), Dovecot and Postfix.

    `legacy`: keys of the [legacy] config section (host, imap_port, smtp_port, ...; ca_file defaults to the
    lab CA). `settings`: further sections of autoport.toml, e.g. {"limits": {"copy_concurrency": 1}}.
    `postfix_overrides` / `dovecot_overrides`: template variables (tests: a stand-in checkpassword, ...).
    `namespace_login`: (login, password) of a legacy user: with [mail] namespace_* = "auto" (the default) the
    target shows the namespace the legacy server answers to NAMESPACE for that user (sidecar/legacy/namespace.py).
    `sysroot`: run Postfix and Dovecot from this Debian 13 root (sidecar.lab.debroot; lab_dir must be inside
    it); the sidecar stays on the host and reaches their tools through wrappers in lab_dir/target/bin.
    """
    lab_dir = lab_dir.resolve()
    if sysroot is not None:
        with _tools(lab_dir, str(sysroot)):
            return _start_target(lab_dir, host=host, domains=domains, legacy=legacy, store_url=store_url,
                                 sidecar=sidecar, settings=settings, postfix_overrides=postfix_overrides,
                                 dovecot_overrides=dovecot_overrides, namespace_login=namespace_login,
                                 sysroot=sysroot)  # fmt: skip
    return _start_target(lab_dir, host=host, domains=domains, legacy=legacy, store_url=store_url,
                         sidecar=sidecar, settings=settings, postfix_overrides=postfix_overrides,
                         dovecot_overrides=dovecot_overrides, namespace_login=namespace_login,
                         sysroot=None)  # fmt: skip


@contextlib.contextmanager
def _tools(lab_dir: Path, sysroot: str) -> Iterator[None]:
    """With a sysroot: its Postfix/Dovecot commands first on PATH (for us and for what we start)."""
    if not sysroot:
        yield
        return
    from sidecar.lab import debroot

    root = Path(sysroot).resolve()
    if not lab_dir.is_relative_to(root):
        raise LabError(f"with a Debian 13 root the lab must live inside it ({debroot.lab_parent(root)}/...)")
    bin_dir = debroot.write_wrappers(root, lab_dir / "target" / "bin")
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{bin_dir}:{old}"
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _start_target(
    lab_dir: Path,
    *,
    host: str,
    domains: Iterable[str],
    legacy: Mapping[str, Any] | None,
    store_url: str | None,
    sidecar: bool,
    settings: Mapping[str, Mapping[str, Any]] | None,
    postfix_overrides: Mapping[str, str] | None,
    dovecot_overrides: Mapping[str, str] | None,
    namespace_login: tuple[str, str] | None,
    sysroot: Path | None,
) -> TargetStack:
    if any(c.isspace() for c in str(lab_dir)):
        # Dovecot splits checkpassword args on spaces, Postfix lists on spaces
        raise LabError(f"lab directory must not contain white space: {lab_dir}")
    pids = proc.load_state(lab_dir).get("pids", {})
    running = [n for n in COMPONENTS if pids.get(n) and proc.pid_alive(int(pids[n]))]
    if running:
        raise LabError(f"target already running in {lab_dir} ({', '.join(running)}): stop it first")
    make_traversable(lab_dir)
    tdir = _mkdir(lab_dir / "target")
    logs_dir = _mkdir(lab_dir / "logs")
    run_dir = _mkdir(lab_dir / "run")
    pf_dir = _mkdir(tdir / "postfix")
    queue = _mkdir(tdir / "postfix-queue")
    data = _mkdir(tdir / "postfix-data", 0o700, "postfix")
    dv_dir = _mkdir(tdir / "dovecot")
    _mkdir(tdir / "dovecot-state", 0o750)
    mail_root = _mkdir(tdir / "mail", 0o770, "vmail")
    logs = {
        DOVECOT: logs_dir / "target-dovecot.log",
        POSTFIX: logs_dir / "target-postfix.log",
        SIDECAR: logs_dir / "sidecar.log",
    }

    ca = tlsgen.ensure_ca(lab_dir / "tls")
    cert = tlsgen.issue_cert(ca, TLS_NAME, ips=[host])
    imap, pop3, smtp, submission, sieve, dashboard_port, smtps = proc.free_ports(host, 7)
    store_url = store_url or f"sqlite:///{lab_dir / 'state.db'}"
    auth_socket = run_dir / "auth.sock"
    socketmap = f"unix:{run_dir / 'socketmap.sock'}"
    milter = f"unix:{run_dir / 'milter.sock'}"

    # the sidecar's configuration: validated by the schema, written with every key commented
    dashboard = (
        {"listen": f"{host}:{dashboard_port}", "token": secrets.token_urlsafe(24)} if sidecar else {"listen": ""}
    )
    legacy_section: dict[str, Any] = {"ca_file": str(ca.cert_file), **dict(legacy or {})}
    data_cfg: dict[str, Any] = {
        "legacy": legacy_section,
        "mail": {"domains": list(domains)},
        "store": {"url": store_url},
        "sockets": {
            "auth": str(auth_socket),
            "socketmap": socketmap,
            "milter": milter,
            # SMTP AUTH through the sidecar's relay only when there is a sidecar to relay
            "sasl": str(run_dir / "sasl.sock") if sidecar else "",
            "dovecot_auth": str(tdir / "dovecot-run" / "autoport-auth"),
        },
        "target": {
            "mail_root": str(mail_root),
            "dovecot_config": str(dv_dir / "dovecot.conf"),
            "postfix_config": str(pf_dir),
        },
        "dashboard": dashboard,
        "log": {"destination": "stderr"},
    }
    for section, values in (settings or {}).items():
        data_cfg.setdefault(section, {}).update(values)
    config_file = lab_dir / CONFIG_NAME
    try:
        cfg = config.from_dict(data_cfg, str(config_file))
    except config.ConfigError as e:
        raise LabError(str(e)) from None
    # 0600: it may hold the legacy admin password
    render.write_atomic(config_file, config.render(cfg, redact=False), 0o600)

    pf_vars = render.postfix_vars(cfg, myhostname=TLS_NAME) | {
        "queue_directory": str(queue),
        "data_directory": str(data),
        # a single 127.0.0.x is no interface address: Postfix refuses it here; services name host:port
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "smtp_bind_address": host,
        "mynetworks": f"{host}/32",
        "smtpd_peername_lookup": "no",
        "smtp_listen": f"{host}:{smtp}",
        "submission_listen": f"{host}:{submission}",
        "smtps_listen": f"{host}:{smtps}" if cfg.target.smtps else "",
        "smtpd_tls_auth_only": "no",
        "smtpd_tls_security_level": "may",
        "submission_tls_security_level": "may",
        "tls_cert_file": str(cert.cert_file),
        "tls_key_file": str(cert.key_file),
        "maillog_file": str(logs[POSTFIX]),
        "maillog_file_prefixes": f"/var, /dev/stdout, {logs_dir}",
        "syslog_name": f"postfix-{host}",
        "alias_maps": aliasmap.default_spec(render.default_map_type(), str(tdir / "aliases")),
    }
    pf_vars |= dict(postfix_overrides or {})
    legacy_ns = None
    if namespace_login is not None and "auto" in (cfg.mail.namespace_prefix, cfg.mail.namespace_separator):
        from sidecar.legacy import namespace
        from sidecar.legacy.imap import SourceError

        try:
            legacy_ns = namespace.probe(cfg.legacy, *namespace_login)
        except SourceError as e:
            raise LabError(f"cannot ask the legacy server for its NAMESPACE: {e}") from None
    dv_vars = render.dovecot_vars(cfg, queue_directory=str(queue), legacy_namespace=legacy_ns) | {
        "listen": host,
        "base_dir": str(tdir / "dovecot-run"),
        "instance_name": f"autoport-target-{host}",
        "state_dir": str(tdir / "dovecot-state"),
        "dovecot_dir": str(dv_dir),
        "disable_plaintext_auth": "no",
        "log_path": str(logs[DOVECOT]),
        "ssl": "yes",
        "ssl_cert": str(cert.cert_file),
        "ssl_key": str(cert.key_file),
        "imap_port": str(imap),
        "imaps_port": "0",
        "pop3_port": str(pop3),
        "pop3s_port": "0",
        "managesieve_port": str(sieve),
        "sasl_relay_upstream": "autoport-auth" if cfg.sockets.sasl else "",  # in base_dir: sockets.dovecot_auth
    }
    dv_vars |= dict(dovecot_overrides or {})
    try:
        # `postfix check` (inside render_postfix) also creates the queue's subdirectories with their owners;
        # Dovecot's LMTP and auth sockets go into one of them (private/), so Postfix's config comes first
        warnings = render.render_postfix(pf_dir, pf_vars)
        warnings += render.render_dovecot(dv_dir, dv_vars)
    except render.RenderError as e:
        raise LabError(f"target configuration: {e}") from None
    if warnings:
        raise LabError("target configuration has warnings:\n" + "\n".join(warnings))
    # as for the legacy server (sidecar/lab/legacy.py): Postfix sleeps on a main.cf/master.cf younger than 2 s,
    # and these were just written, whole; dated back, Postfix starts without that wait
    past = time.time() - 10
    for name in render.POSTFIX_TEMPLATES:
        os.utime(pf_dir / name, (past, past))

    stack = TargetStack(
        host=host,
        imap=imap,
        pop3=pop3,
        smtp=smtp,
        submission=submission,
        managesieve=sieve,
        socketmap=socketmap,
        dashboard=int(cfg.dashboard.listen.rpartition(":")[2]) if sidecar and cfg.dashboard.listen else None,
        dir=lab_dir,
        config=config_file,
        dovecot_config=dv_dir / "dovecot.conf",
        postfix_config=pf_dir,
        queue_directory=queue,
        mail_root=Path(cfg.target.mail_root),  # a second node shares the first node's (settings["target"])
        auth_socket=auth_socket,
        milter=milter,
        store_url=store_url,
        ca_file=ca.cert_file,
        sidecar=sidecar,
        logs=logs,
        pids={},
        smtps=smtps if cfg.target.smtps else 0,
        sysroot=str(sysroot or ""),
    )
    _save(lab_dir, stack)
    try:
        if sidecar:
            # the sidecar refuses a store without schema; init is idempotent (creates or upgrades)
            exe = Path(sys.executable).parent / "autoport"
            proc.run([str(exe), "--config", str(config_file), "store", "init"], what="autoport store init")
        for name in COMPONENTS:
            if name == SIDECAR and not sidecar:
                continue
            _start_component(lab_dir, stack, name)
    except BaseException:
        stop_target(lab_dir)
        raise
    return stack


def _start_component(lab_dir: Path, stack: TargetStack, name: str) -> int:
    with _tools(lab_dir, stack.sysroot):
        return _start_component_here(lab_dir, stack, name)


def _start_component_here(lab_dir: Path, stack: TargetStack, name: str) -> int:
    log = stack.logs[name]
    log.parent.mkdir(parents=True, exist_ok=True)
    if name == SIDECAR:
        # the sockets of the configuration the sidecar starts with (a test may have changed it)
        sk = config.load(str(stack.config)).sockets
        paths = [Path(sk.auth)] + [Path(p) for p in map(config.unix_path, (sk.socketmap, sk.milter)) if p]
        for stale in paths:  # a socket left by a killed sidecar would look ready
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # we are not systemd
        exe = Path(sys.executable).parent / "autoport"
        pid = proc.spawn([str(exe), "--config", str(stack.config), "serve"], log, env=env)
        proc.record_pid(lab_dir, name, pid)

        def ready() -> bool:
            if not proc.pid_alive(pid):
                raise LabError(f"the sidecar exited during start-up; see {log}:\n{proc.log_tail(log)}")
            # the milter's socket gets its group and mode right after libmilter creates it
            return all(p.is_socket() and p.stat().st_mode & 0o060 == 0o060 for p in paths)

        proc.wait_for(ready, 30, what=f"the sidecar's sockets {', '.join(map(str, paths))} (see {log})")
    elif name == DOVECOT:
        pid = proc.spawn(["dovecot", "-F", "-c", str(stack.dovecot_config)], log.with_suffix(".out"))
        proc.record_pid(lab_dir, name, pid)
        for port in (stack.imap, stack.pop3, stack.managesieve):
            proc.wait_service(stack.host, port, pid, what="target Dovecot", log=log)
        auth = stack.queue_directory / "private" / "auth"
        proc.wait_for(auth.is_socket, 10, what=f"Dovecot's auth socket {auth} (see {log})")
    elif name == POSTFIX:
        pidfile = stack.queue_directory / "pid" / "master.pid"
        pid = proc.start_postfix(stack.postfix_config, pidfile, output=log.with_suffix(".out"), log=log)
        proc.record_pid(lab_dir, name, pid)
        for port in (p for p in (stack.smtp, stack.submission, stack.smtps) if p):
            proc.wait_service(stack.host, port, pid, what="target Postfix", log=log)
    else:
        raise ValueError(f"unknown target component {name!r} (choose from {', '.join(COMPONENTS)})")
    stack.pids[name] = pid
    _save(lab_dir, stack)
    return pid



def _stop_component(lab_dir: Path, name: str, stack: TargetStack | None) -> None:
    pid = proc.load_state(lab_dir).get("pids", {}).get(name)
    if pid and name == POSTFIX and stack is not None and proc.pid_alive(int(pid)):
        # the orderly way first (children finish their deliveries); the pid below is the fallback
        with contextlib.suppress(subprocess.SubprocessError, OSError, LabError), _tools(lab_dir, stack.sysroot):
            subprocess.run(
                ["postfix", "-c", str(stack.postfix_config), "stop"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False,
            )  # fmt: skip
            proc.wait_for(lambda: not proc.pid_alive(int(pid)), 10, what="Postfix to stop")
    if pid:
        proc.stop_group(int(pid))
    if name in proc.load_state(lab_dir).get("pids", {}):
        proc.record_pid(lab_dir, name, None)
    if stack is not None:
        stack.pids[name] = None
        _save(lab_dir, stack)




def stop_target(lab_dir: Path) -> list[str]:
    """Stop Postfix, Dovecot and the sidecar by their recorded pids (process groups included); their names."""
    lab_dir = lab_dir.resolve()
    stack = load_target(lab_dir)
    pids = proc.load_state(lab_dir).get("pids", {})
    stopped = []
    for name in reversed(COMPONENTS):
        if pids.get(name):
            stopped.append(name)
        with contextlib.suppress(LabError):
            _stop_component(lab_dir, name, stack)
    return stopped


def restart_target_component(lab_dir: Path, name: str) -> int:
    """Stop and start one component ("target-dovecot", "target-postfix" or "sidecar"); the new pid."""
    name = {"dovecot": DOVECOT, "postfix": POSTFIX}.get(name, name)
    if name not in COMPONENTS:
        raise ValueError(f"unknown target component {name!r} (choose from {', '.join(COMPONENTS)})")
    lab_dir = lab_dir.resolve()
    stack = load_target(lab_dir)
    if stack is None:
        raise LabError(f"no target stack recorded in {lab_dir}")
    _stop_component(lab_dir, name, stack)
    return _start_component(lab_dir, stack, name)
