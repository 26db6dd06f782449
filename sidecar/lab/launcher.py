"""`autoport lab`: a legacy server and a target stack on loopback, as one unit.

The same code path serves the end-to-end tests, the quick-start demo and a trial against a real legacy
server (`--legacy-external SPEC`). Everything it starts is recorded by pid in DIR/lab-state.json and stopped
by `lab_down`, from any process.

More (the reasons and limits behind this module): docs/modules.md, sidecar/lab/launcher.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, cast

from sidecar.lab import proc
from sidecar.lab.info import LabInfo, LegacyInfo, TargetInfo
from sidecar.lab.proc import LabError

LEGACY_HOST = "127.0.0.2"
TARGET_HOST = "127.0.0.3"
NODE2_HOST = "127.0.0.4"
SIDECAR = "sidecar"
POSTGRES = "postgres"
# [limits] cutover_grace of a lab that starts its own legacy server (unless `settings` name one): the grace covers
# a login answered just before cutover reaching the legacy server, which on loopback takes milliseconds; the
# production default (sidecar/config.py) is sized for a real network. Every migration in a lab waits it once, so it
# is most of a test's cutover time. AUTOPORT_LAB_CUTOVER_GRACE overrides it (e.g. to run the suite with a longer one).
LAB_CUTOVER_GRACE = float(os.environ.get("AUTOPORT_LAB_CUTOVER_GRACE", "1.0"))


def _bin(name: str) -> str:
    """A console script of this installation (next to the running interpreter)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def _external_legacy(spec_path: str) -> dict[str, Any]:
    p = Path(spec_path).resolve()
    try:
        spec = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise LabError(f"{p}: cannot read legacy SPEC: {e}") from None
    known = {
        "host", "imap_port", "imap_tls", "pop3_port", "pop3_tls", "smtp_port", "smtp_tls", "submission_port",
        "submission_tls", "sieve_port", "sieve_tls", "tls_verify", "tls_server_name", "ca_file", "domains",
        "users_file", "admin_user", "admin_password",
    }  # fmt: skip
    for key in spec:
        if key not in known:
            raise LabError(f"{p}: unknown key '{key}' in legacy SPEC")
    if "host" not in spec or "domains" not in spec:
        raise LabError(f"{p}: legacy SPEC needs 'host' and 'domains'")
    users: list[dict[str, str | None]] = []
    if spec.get("users_file"):
        uf = (p.parent / spec["users_file"]).resolve()
        for n, line in enumerate(uf.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if "@" not in parts[0]:
                raise LabError(f"{uf}:{n}: expected 'address [password]'")
            users.append({"address": parts[0], "login": parts[0], "password": parts[1] if len(parts) > 1 else None})
    return {"spec": spec, "users": users}


def lab_up(
    lab_dir: Path,
    *,
    users: int = 5,
    profile: str = "dovecot",
    external: str | None = None,
    store: str = "sqlite",
    bare_logins: bool = False,
    seed: int = 1,
    legacy_host: str = LEGACY_HOST,
    target_host: str = TARGET_HOST,
    sidecar: bool = True,
    messages_per_user: int | None = None,
    settings: dict[str, dict[str, Any]] | None = None,
    nodes: int = 1,
    legacy_shared: bool = False,
    legacy_identity_users: bool = False,
    sysroot: Path | None = None,
) -> LabInfo:
    """Start legacy (unless external), store, target stack and sidecar; return the lab description.

    nodes=2 adds a second front-end node (Postfix + Dovecot + sidecar on NODE2_HOST, in DIR/node2) sharing the
    store (PostgreSQL: store="postgresql" is required) and the mail root with the first: info["nodes"] lists the
    target descriptions of all nodes, info["target"] is the first.

    sysroot: run the target's Postfix and Dovecot from this Debian 13 root (sidecar.lab.debroot; lab_dir inside
    it, ROOT/l/NAME); the legacy server and the sidecar stay on the host.
    """
    if nodes not in (1, 2):
        raise LabError("the lab starts one or two front-end nodes")
    if nodes == 2 and store != "postgresql":
        raise LabError("several nodes share one migration through PostgreSQL: use --store postgresql")
    from sidecar.lab import legacy as legacy_mod
    from sidecar.lab import target as target_mod

    lab_dir = lab_dir.resolve()
    lab_dir.mkdir(parents=True, exist_ok=True)
    legacy_mod.make_traversable(lab_dir)
    state = proc.load_state(lab_dir)
    if any(proc.pid_alive(pid) for pid in (state.get("pids") or {}).values() if pid):
        raise LabError(f"a lab is already running in {lab_dir}: `autoport lab down --dir {lab_dir}` first")
    try:
        # 1. the legacy server
        if external:
            ext = _external_legacy(external)
            spec = ext["spec"]
            legacy_cfg: dict[str, Any] = {k: v for k, v in spec.items() if k not in ("domains", "users_file")}
            domains = list(spec["domains"])
            user_list = ext["users"]
            legacy_info: LegacyInfo = {
                "host": spec["host"],
                "imap": spec.get("imap_port", 143) or None,
                "pop3": spec.get("pop3_port", 110) or None,
                "smtp": spec.get("smtp_port", 25) or None,
                "submission": spec.get("submission_port", 587) or None,
                "sieve": spec.get("sieve_port", 4190) or None,
                "admin": {"user": spec.get("admin_user") or None, "password": spec.get("admin_password") or None},
                "external": True,
            }
        else:
            srv = legacy_mod.start_legacy(
                lab_dir,
                host=legacy_host,
                profile=profile,
                users=users,
                seed=seed,
                bare_logins=bare_logins,
                messages_per_user=messages_per_user,
                shared_folders=legacy_shared,
                identity_users=legacy_identity_users,
            )
            domains = [srv.domain]
            user_list = [{"address": u.address, "login": u.login, "password": u.password} for u in srv.users]
            legacy_cfg = srv.legacy_config()
            legacy_info = {
                "host": srv.host,
                "imap": srv.imap,
                "imaps": srv.imaps,
                "pop3": srv.pop3,
                "pop3s": srv.pop3s,
                "smtp": srv.smtp,
                "submission": srv.submission,
                "sieve": srv.sieve,
                "admin": {"user": srv.admin_user, "password": srv.admin_password},
                "profile": srv.profile,
                "ca_file": str(srv.ca_file),
                "tls_name": srv.tls_name,
                "external": False,
            }
        # the target offers what the legacy server offered (ports, SMTP AUTH, size): asked as doctor asks
        settings = _offer_settings(legacy_cfg, settings or {})
        if not external:
            settings = with_lab_grace(settings)
        # 2. the store
        store_url = _start_store(lab_dir, store)
        # 3. the target stack (Postfix + Dovecot from the repository's fragments) and its autoport config
        tgt = target_mod.start_target(
            lab_dir,
            host=target_host,
            legacy=legacy_cfg,
            domains=domains,
            store_url=store_url,
            sidecar=sidecar,
            settings=settings or {},
            namespace_login=_namespace_login(user_list),
            sysroot=sysroot,
        )
        config_path = Path(tgt.config)
        if not sidecar:
            _run_autoport(config_path, "store", "init")
        node_infos: list[TargetInfo] = [_target_info(tgt)]
        if nodes == 2:
            node_dir = lab_dir / "node2"
            node_dir.mkdir(exist_ok=True)
            shared = {**(settings or {})}
            shared["target"] = {**shared.get("target", {}), "mail_root": str(tgt.mail_root)}
            tgt2 = target_mod.start_target(
                node_dir,
                host=NODE2_HOST,
                legacy={**legacy_cfg, "ca_file": legacy_cfg.get("ca_file") or str(tgt.ca_file)},
                domains=domains,
                store_url=store_url,
                sidecar=sidecar,
                settings=shared,
                namespace_login=_namespace_login(user_list),
            )
            node_infos.append({**_target_info(tgt2), "config": str(tgt2.config), "dir": str(node_dir)})
            state = proc.load_state(lab_dir)
            state["nodes"] = [str(node_dir)]
            proc.save_state(lab_dir, state)
    except BaseException:
        with contextlib.suppress(Exception):
            lab_down(lab_dir)
        raise
    state = proc.load_state(lab_dir)
    info: LabInfo = {
        "dir": str(lab_dir),
        "config": str(config_path),
        "legacy": legacy_info,
        "target": node_infos[0],
        "nodes": node_infos,
        "users": [{"address": u["address"], "login": u["login"], "password": u["password"]} for u in user_list],
        "domains": domains,
        "store": store_url,
        "pids": {k: v for k, v in (state.get("pids") or {}).items() if v},
        "logs": str(lab_dir / "logs"),
    }
    state["info"] = info
    proc.save_state(lab_dir, state)
    return info


def with_lab_grace(settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """settings with [limits] cutover_grace = LAB_CUTOVER_GRACE unless they set one (a lab's own legacy server)."""
    return {**settings, "limits": {"cutover_grace": LAB_CUTOVER_GRACE, **settings.get("limits", {})}}


def _offer_settings(legacy_cfg: dict[str, Any], settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """settings with [target] smtps, smtp_auth_on_25, plaintext_auth, message_size_limit from the legacy offer
    (sidecar/legacy/offer.py), where the caller did not set them."""
    from sidecar import config as config_mod
    from sidecar.legacy import offer

    legacy = config_mod.from_dict({"legacy": {k: v for k, v in legacy_cfg.items() if k != "admin_password"}}).legacy
    found = offer.settings(offer.probe(legacy))
    out = dict(settings)
    out["target"] = {**found, **settings.get("target", {})}
    return out


def _namespace_login(users: list[dict[str, Any]]) -> tuple[str, str] | None:
    """A legacy user who can log in, to ask the legacy server for its NAMESPACE (the target shows the same)."""
    for u in users:
        if u.get("password"):
            return str(u["login"]), str(u["password"])
    return None


def _target_info(tgt: Any) -> TargetInfo:
    info = {
        **tgt.to_json(),
        "postfix_config": str(tgt.postfix_config),
        "dovecot_config": str(tgt.dovecot_config),
        "mail_root": str(tgt.mail_root),
    }
    return cast(TargetInfo, info)


def _start_store(lab_dir: Path, kind: str) -> str:
    if kind == "sqlite":
        data = lab_dir / "store"
        data.mkdir(exist_ok=True)
        return f"sqlite:///{data / 'autoport.db'}"
    from sidecar.lab import pgcluster

    cluster = pgcluster.PgCluster(lab_dir / "pg")
    cluster.start()
    proc.record_pid(lab_dir, POSTGRES, cluster.pid)
    state = proc.load_state(lab_dir)
    state["pg"] = {"dir": str(cluster.dir)}
    proc.save_state(lab_dir, state)
    return cluster.create_database("autoport")


def _run_autoport(config: Path, *args: str) -> str:
    return proc.run([_bin("autoport"), "--config", str(config), *args], what=f"autoport {' '.join(args)}")


def lab_down(lab_dir: Path) -> list[str]:
    """Stop every process the lab recorded (target first, legacy last); return their names."""
    lab_dir = lab_dir.resolve()
    state = proc.load_state(lab_dir)
    pids: dict[str, int | None] = dict(state.get("pids") or {})
    stopped = []
    for node in state.get("nodes") or []:
        stopped += [f"node2:{n}" for n in lab_down(Path(node))]
    # Postfix and Dovecot have their own stop commands that also reap their children; use them first.
    with contextlib.suppress(Exception):
        from sidecar.lab import target as target_mod

        target_mod.stop_target(lab_dir)
    with contextlib.suppress(Exception):
        from sidecar.lab import legacy as legacy_mod

        legacy_mod.stop_legacy(lab_dir)
    if state.get("pg"):
        with contextlib.suppress(Exception):
            from sidecar.lab import pgcluster

            pgcluster.PgCluster(Path(state["pg"]["dir"])).stop()
    for name, pid in pids.items():
        if pid:
            proc.stop_pid(pid)
            stopped.append(name)
    state = proc.load_state(lab_dir)
    if state:
        state["pids"] = {}
        proc.save_state(lab_dir, state)
    return stopped


def lab_restart(lab_dir: Path, name: str) -> int:
    """Restart one component the lab started: sidecar, target-postfix, target-dovecot, legacy-*."""
    lab_dir = lab_dir.resolve()
    state = proc.load_state(lab_dir)
    if not state:
        raise LabError(f"no lab in {lab_dir}")
    if name.startswith("node2:"):
        return lab_restart(lab_dir / "node2", name.split(":", 1)[1])
    if name.startswith("legacy-"):
        from sidecar.lab import legacy as legacy_mod

        return legacy_mod.restart_legacy_component(lab_dir, name)
    if name.startswith("target-") or name == SIDECAR:
        from sidecar.lab import target as target_mod

        return target_mod.restart_target_component(lab_dir, name)
    raise LabError(f"unknown lab component {name!r} (sidecar, target-postfix, target-dovecot, legacy-postfix, ...)")


def lab_info(lab_dir: Path) -> LabInfo:
    state = proc.load_state(lab_dir.resolve())
    if "info" not in state:
        raise LabError(f"no lab in {lab_dir}")
    info: LabInfo = state["info"]
    info["pids"] = {k: v for k, v in (state.get("pids") or {}).items() if v and proc.pid_alive(v)}
    return info


def print_summary(info: LabInfo) -> None:
    lg, tg = info["legacy"], info["target"]
    print(f"lab in {info['dir']} (logs in {info['logs']}, config {info['config']})")
    print(f"  legacy  {lg['host']}: IMAP {lg['imap']}  POP3 {lg['pop3']}  SMTP {lg['smtp']}  sieve {lg['sieve']}")
    print(
        f"  target  {tg['host']}: IMAP {tg['imap']}  POP3 {tg['pop3']}  SMTP {tg['smtp']}"
        f"  submission {tg['submission']}  socketmap {tg['socketmap']}"
    )
    for u in info["users"][:5]:
        print(f"  user    {u['login']}  password {u['password']}")
    if len(info["users"]) > 5:
        print(f"  ... and {len(info['users']) - 5} more users (lab up --json lists them)")
    print(f"  stop:   autoport lab down --dir {info['dir']}")
