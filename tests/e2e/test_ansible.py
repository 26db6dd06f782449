"""The Ansible deployment (ansible/), run for real on this machine.

- ansible-lint is clean on ansible/; every role's argument_specs lists exactly its defaults; the template tasks
  give the fragments exactly the variables sidecar.mta.render gives them.
- site.yml runs with `-i localhost, -c local` into a temporary prefix (autoport_prefix), services left to the test
  (autoport_manage_services: false); a second run reports changed=0; no secret reaches the output.
- What it deployed equals what sidecar.mta.render makes of the same variables (one set of templates, two renderers);
  the systemd unit passes `systemd-analyze verify`; the store, its directory and the sockets have the owners and
  modes Dovecot and Postfix need.
- End to end: the deployed Dovecot, Postfix and sidecar (the deployed venv's `autoport serve`, as the unit's user,
  telling a stand-in for systemd READY=1) are started on their own 127.x address, pointed at a lab legacy server
  on another; a user logs in through the deployed IMAP with the legacy password (pass-through) and postmap gets
  an answer from the deployed socketmap. Everything started is stopped; no process is left.

The playbook reads the repository from a snapshot taken when the module starts (other work in the tree must not
change the source between the two runs), so `changed=0` means the playbook is idempotent, nothing else.
"""

from __future__ import annotations

import contextlib
import grp
import imaplib
import json
import os
import pwd
import random
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar import config
from sidecar.lab import legacy, proc, target, tlsgen
from sidecar.mta import render

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
VENV_BIN = Path(sys.executable).parent
PLAYBOOK = VENV_BIN / "ansible-playbook"
LINT = VENV_BIN / "ansible-lint"
ROLES = ("postfix", "dovecot", "autoport", "postgresql")
# what the lab also needs from the repository to be deployed from a snapshot
SNAPSHOT = ("postfix", "dovecot", "deploy", "sidecar", "pyproject.toml", "README.md")
RECAP = re.compile(r"^localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)

needs_ansible = pytest.mark.skipif(not PLAYBOOK.exists(), reason="ansible-core is not installed (make install)")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.update(
        PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_RETRY_FILES_ENABLED="0",
    )
    return env


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _template_task_vars(role: str, marker: str) -> set[str]:
    for task in _yaml(ANSIBLE_DIR / "roles" / role / "tasks" / "main.yml"):
        src = str(task.get("ansible.builtin.template", {}).get("src", ""))
        if marker in src:
            return set(task.get("vars", {}))
    raise AssertionError(f"no template task rendering {marker} in role {role}")


# --- static checks ------------------------------------------------------------------------------------------------


@needs_ansible
def test_ansible_lint_clean() -> None:
    p = subprocess.run(
        [str(LINT), "--offline", "--nocolor", "ansible/"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_cover_defaults(role: str) -> None:
    defaults = set(_yaml(ANSIBLE_DIR / "roles" / role / "defaults" / "main.yml"))
    specs = _yaml(ANSIBLE_DIR / "roles" / role / "meta" / "argument_specs.yml")
    options = set(specs["argument_specs"]["main"]["options"])
    assert options == defaults, f"{role}: in specs only {options - defaults}, in defaults only {defaults - options}"


def _example_config() -> config.Config:
    return config.from_dict({"mail": {"domains": ["example.org"]}})


def test_postfix_template_vars_are_renders() -> None:
    """The template task passes exactly render.postfix_vars()' variables, each from postfix_NAME."""
    expected = set(render.postfix_vars(_example_config()))
    assert _template_task_vars("postfix", "/postfix/") == expected
    defaults = set(_yaml(ANSIBLE_DIR / "roles" / "postfix" / "defaults" / "main.yml"))
    assert {f"postfix_{name}" for name in expected} <= defaults


def test_dovecot_template_vars_are_renders() -> None:
    """The template task passes exactly render.dovecot_vars()' variables (dovecot_dir is dovecot_config_dir)."""
    expected = set(render.dovecot_vars(_example_config()))
    assert _template_task_vars("dovecot", "/dovecot/") == expected
    defaults = set(_yaml(ANSIBLE_DIR / "roles" / "dovecot" / "defaults" / "main.yml"))
    names = {f"dovecot_{name}" for name in expected - {"dovecot_dir"}} | {"dovecot_config_dir"}
    assert names <= defaults


# --- the deployment -------------------------------------------------------------------------------------------------


def _loopback() -> str:
    return f"127.{random.randint(64, 250)}.{random.randint(0, 255)}.{random.randint(2, 254)}"


def _free_ports(host: str, n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        if (port := proc.free_port(host)) not in ports:
            ports.append(port)
    return ports


def _snapshot(dest: Path) -> Path:
    for name in SNAPSHOT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


@dataclass
class Deployment:
    prefix: Path  # autoport_prefix
    work: Path  # snapshot, variables, logs
    repo: Path  # the snapshot the playbook deployed
    host: str  # the target's 127.x address
    legacy: legacy.LegacyServer
    legacy_dir: Path
    ports: dict[str, int]
    secrets: list[str]
    postfix_overrides: dict[str, str]
    dovecot_overrides: dict[str, str]
    runs: list[str] = field(default_factory=list)

    @property
    def config_file(self) -> Path:
        return self.prefix / "etc/autoport/autoport.toml"

    @property
    def venv(self) -> Path:
        return self.prefix / "opt/autoport/venv"


def _run_playbook(dep: Deployment, *extra: str) -> str:
    argv = [
        str(PLAYBOOK), "-i", "localhost,", "-c", "local", "-e", f"@{dep.work / 'vars.json'}",
        "-e", "autoport_hosts=all", *extra, str(ANSIBLE_DIR / "site.yml"),
    ]  # fmt: skip
    p = subprocess.run(argv, cwd=ANSIBLE_DIR, env=_env(), capture_output=True, text=True, timeout=900, check=False)
    out = p.stdout + p.stderr
    (dep.work / f"run{len(dep.runs) + 1}.log").write_text(out)
    dep.runs.append(out)
    assert p.returncode == 0, out[-6000:]
    return out


def _recap(out: str) -> dict[str, int]:
    m = RECAP.search(out)
    assert m, out[-3000:]
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, m.groups()), strict=True))


@pytest.fixture(scope="module")
def deployed() -> Iterator[Deployment]:
    if not PLAYBOOK.exists():
        pytest.skip("ansible-core is not installed (make install)")
    work = Path(tempfile.mkdtemp(prefix="ap-ans-", dir="/tmp"))
    os.chmod(work, 0o755)
    legacy_dir = Path(tempfile.mkdtemp(prefix="ap-ansl-", dir="/tmp"))
    os.chmod(legacy_dir, 0o755)
    host, legacy_host = _loopback(), _loopback()
    while legacy_host == host:
        legacy_host = _loopback()
    try:
        repo = _snapshot(work / "repo")
        prefix = work / "p"
        logs = work / "logs"
        logs.mkdir(mode=0o755)
        srv = legacy.start_legacy(legacy_dir, host=legacy_host, users=2)
        ca = tlsgen.ensure_ca(work / "tls")
        cert = tlsgen.issue_cert(ca, target.TLS_NAME, ips=[host])
        names = ("imap", "pop3", "sieve", "smtp", "submission", "milter")
        ports = dict(zip(names, _free_ports(host, len(names)), strict=True))
        token = "tok-" + os.urandom(8).hex()
        # the lab's values (sidecar/lab/target.py), here as Ansible variables
        postfix_overrides = {
            "myhostname": target.TLS_NAME,
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "smtp_bind_address": host,
            "mynetworks": f"{host}/32",
            "smtpd_peername_lookup": "no",
            "smtp_listen": f"{host}:{ports['smtp']}",
            "submission_listen": f"{host}:{ports['submission']}",
            "smtpd_tls_auth_only": "no",
            "submission_tls_security_level": "may",
            "tls_cert_file": str(cert.cert_file),
            "tls_key_file": str(cert.key_file),
            "maillog_file": str(logs / "postfix.log"),
            "maillog_file_prefixes": f"/var, /dev/stdout, {logs}",
            "syslog_name": f"postfix-{host}",
        }
        dovecot_overrides = {
            "listen": host,
            "instance_name": f"autoport-ansible-{host}",
            "disable_plaintext_auth": "no",
            "log_path": str(logs / "dovecot.log"),
            "ssl": "yes",
            "ssl_cert": str(cert.cert_file),
            "ssl_key": str(cert.key_file),
            "imap_port": str(ports["imap"]),
            "imaps_port": "0",
            "pop3_port": str(ports["pop3"]),
            "pop3s_port": "0",
            "managesieve_port": str(ports["sieve"]),
        }
        variables: dict[str, Any] = {
            "ansible_python_interpreter": "/usr/bin/python3",
            "autoport_prefix": str(prefix),
            "autoport_manage_services": False,
            "autoport_repo": str(repo),
            "autoport_domains": [srv.domain],
            # the role takes the admin password in its own variable, autoport_legacy_admin_password
            "autoport_legacy": {k: v for k, v in srv.legacy_config().items() if k != "admin_password"},
            "autoport_legacy_admin_password": srv.admin_password,
            "autoport_milter": f"inet:{host}:{ports['milter']}",
            "autoport_dashboard_listen": "",
            "autoport_dashboard_token": token,
            "autoport_log_destination": "stderr",
            "autoport_tls_cert_file": str(cert.cert_file),
            "autoport_tls_key_file": str(cert.key_file),
            **{f"postfix_{k}": v for k, v in postfix_overrides.items()},
            **{f"dovecot_{k}": v for k, v in dovecot_overrides.items()},
        }
        (work / "vars.json").write_text(json.dumps(variables, indent=1))
        os.chmod(work / "vars.json", 0o600)
        dep = Deployment(
            prefix=prefix, work=work, repo=repo, host=host, legacy=srv, legacy_dir=legacy_dir, ports=ports,
            secrets=[srv.admin_password, token], postfix_overrides=postfix_overrides,
            dovecot_overrides=dovecot_overrides,
        )  # fmt: skip
        _run_playbook(dep, "--diff")
        _run_playbook(dep)
        yield dep
    finally:
        legacy.stop_legacy(legacy_dir)
        if not os.environ.get("AUTOPORT_KEEP_LABS"):
            shutil.rmtree(legacy_dir, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_first_run_deploys(deployed: Deployment) -> None:
    recap = _recap(deployed.runs[0])
    assert recap["failed"] == 0 and recap["unreachable"] == 0
    assert recap["changed"] > 0


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_second_run_changes_nothing(deployed: Deployment) -> None:
    recap = _recap(deployed.runs[1])
    assert recap["changed"] == 0, "\n".join(
        line for line in deployed.runs[1].splitlines() if line.startswith(("TASK", "changed", "RUNNING"))
    )


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_no_secret_in_output(deployed: Deployment) -> None:
    for out in deployed.runs:
        for secret in deployed.secrets:
            assert secret not in out


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_deployed_files_equal_render(deployed: Deployment) -> None:
    """Ansible's template module and sidecar.mta.render agree on every file, from the same variables."""
    cfg = config.load(deployed.config_file)
    assert cfg.mail.domains == [deployed.legacy.domain]
    assert cfg.legacy.admin_password == deployed.legacy.admin_password
    queue = deployed.prefix / "var/spool/postfix"
    pf = render.postfix_vars(cfg) | {
        "queue_directory": str(queue),
        "data_directory": str(deployed.prefix / "var/lib/postfix"),
        "alias_maps": f"hash:{deployed.prefix}/var/lib/autoport-postfix/aliases",
        **deployed.postfix_overrides,
    }
    for dest, src in render.POSTFIX_TEMPLATES.items():
        expected = render.render_template(f"postfix/{src}", pf, root=deployed.repo)
        assert (deployed.prefix / "etc/postfix" / dest).read_text() == expected, dest
    shim = deployed.prefix / "usr/local/lib/autoport/sidecar/edge/checkpassword.py"
    dv = render.dovecot_vars(cfg, queue_directory=str(queue)) | {
        "base_dir": str(deployed.prefix / "run/dovecot"),
        "state_dir": str(deployed.prefix / "var/lib/dovecot"),
        "checkpassword_args": f"/usr/bin/python3 -I -S {shim} --socket {cfg.sockets.auth}",
        # the relay's Dovecot listener, relative to the (prefixed) base_dir as both renderings write it
        "sasl_relay_upstream": render.dovecot_listener(cfg.sockets.dovecot_auth, str(deployed.prefix / "run/dovecot")),
        **deployed.dovecot_overrides,
    }
    assert dv["sasl_relay_upstream"] == "autoport-auth"
    assert dv["dovecot_dir"] == str(deployed.prefix / "etc/dovecot")
    for dest, src in render.dovecot_templates(dv["sql_driver"], root=deployed.repo).items():
        expected = render.render_template(src, dv, root=deployed.repo)
        assert (deployed.prefix / "etc/dovecot" / dest).read_text() == expected, dest
    # the shim Dovecot runs is the deployed package's
    assert shim.resolve().is_relative_to(deployed.venv.resolve())
    assert render.world_executable("/usr/bin/python3")


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_files_owners_and_modes(deployed: Deployment) -> None:
    def owner(p: Path) -> tuple[str, str, int]:
        st = p.stat()
        return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)

    p = deployed.prefix
    assert owner(p / "var/lib/autoport") == ("autoport", "dovecot", 0o2750)
    assert owner(p / "var/lib/autoport/state.db") == ("autoport", "dovecot", 0o640)
    assert owner(p / "etc/autoport/autoport.toml") == ("root", "autoport", 0o640)
    assert owner(p / "etc/dovecot/dovecot-sql.conf.ext")[1:] == ("dovecot", 0o640)
    assert owner(p / "var/lib/postfix")[:2] == ("postfix", "postfix")
    assert owner(p / "var/vmail") == ("vmail", "vmail", 0o770)
    # the alias map: the sidecar's to rewrite, Postfix's to read (written once by the role, before any start)
    assert owner(p / "var/lib/autoport-postfix") == ("autoport", "autoport", 0o755)
    assert owner(p / "var/lib/autoport-postfix/aliases.db")[2] == 0o644
    assert (p / "var/lib/autoport-postfix/aliases").read_text().startswith("# autoport: generated")
    members = {g.gr_name for g in grp.getgrall() if "autoport" in g.gr_mem}
    assert {"dovecot", "postfix", "postdrop", "vmail"} <= members


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_systemd_unit_verifies(deployed: Deployment) -> None:
    unit = deployed.prefix / "etc/systemd/system/autoport.service"
    text = unit.read_text()
    wanted = ["Type=notify", "Restart=on-failure", "User=autoport", "NoNewPrivileges=yes", "ProtectSystem=strict"]
    wanted += ["PrivateTmp=yes", "ProtectHome=yes", f"ReadWritePaths={deployed.prefix}/var/lib/autoport"]
    for line in wanted:
        assert line in text
    # CAP_KILL: the cutover ends Dovecot 2.4's login processes (dovenull) that proxy the account
    caps = {"CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_SETUID", "CAP_SETGID", "CAP_KILL"}
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        m = re.search(rf"^{key}=(.*)$", text, re.M)
        assert m and set(m.group(1).split()) == caps, key
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    p = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr


# --- end to end -----------------------------------------------------------------------------------------------------



def unit_caps(unit: Path) -> str:
    """The unit's AmbientCapabilities in setpriv's form (+chown,+kill,...): the sidecar runs with exactly those."""
    m = re.search(r"^AmbientCapabilities=(.*)$", unit.read_text(), re.M)
    assert m, unit
    return ",".join("+" + c.lower().removeprefix("cap_") for c in m.group(1).split())


@dataclass
class Running:
    pids: dict[str, int] = field(default_factory=dict)


def _wait_port(host: str, port: int, pid: int, what: str, log: Path) -> None:
    def up() -> bool:
        assert proc.pid_alive(pid), f"{what} exited; see {log}:\n{_tail(log)}"
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.3):
            return True
        return False

    proc.wait_for(up, 30, what=f"{what} on {host}:{port}")


def _tail(path: Path, n: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


@pytest.fixture
def running(deployed: Deployment) -> Iterator[Running]:
    """The deployed sidecar (as the unit runs it), Dovecot and Postfix; all stopped afterwards."""
    dep, run = deployed, Running()
    logs = dep.work / "logs"
    postfix_dir = dep.prefix / "etc/postfix"
    pidfile = dep.prefix / "var/spool/postfix/pid/master.pid"
    notify_dir = Path(tempfile.mkdtemp(prefix="ap-ansn-", dir="/tmp"))
    os.chmod(notify_dir, 0o755)
    try:
        # the sidecar: the unit's user and capabilities, and a NOTIFY_SOCKET standing in for systemd (Type=notify)
        notify_path = notify_dir / "notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        os.chmod(notify_path, 0o666)  # the sidecar's user must send to it
        notify.settimeout(30)
        caps = unit_caps(dep.prefix / "etc/systemd/system/autoport.service")
        argv = [
            "setpriv", "--reuid=autoport", "--regid=autoport", "--init-groups", f"--inh-caps={caps}",
            f"--ambient-caps={caps}", "--no-new-privs", "--",
            str(dep.venv / "bin/autoport"), "--config", str(dep.config_file), "serve",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"} | {"NOTIFY_SOCKET": str(notify_path)}
        run.pids["sidecar"] = proc.spawn(argv, logs / "sidecar.log", env=env)
        try:
            message = notify.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no READY=1 from the sidecar:\n{_tail(logs / 'sidecar.log')}") from None
        finally:
            notify.close()
        assert "READY=1" in message, message
        # Dovecot and Postfix, from the deployed configuration
        run.pids["dovecot"] = proc.spawn(
            ["dovecot", "-F", "-c", str(dep.prefix / "etc/dovecot/dovecot.conf")], logs / "dovecot.out"
        )
        _wait_port(dep.host, dep.ports["imap"], run.pids["dovecot"], "deployed Dovecot", logs / "dovecot.log")
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        with open(logs / "postfix.out", "ab") as out:
            rc = subprocess.run(
                ["postfix", "-c", str(postfix_dir), "start"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=60, check=False,
            ).returncode  # fmt: skip
        assert rc == 0, _tail(logs / "postfix.log")
        run.pids["postfix"] = proc.read_pidfile(pidfile)
        _wait_port(dep.host, dep.ports["smtp"], run.pids["postfix"], "deployed Postfix", logs / "postfix.log")
        yield run
    finally:
        if run.pids.get("postfix"):
            subprocess.run(
                ["postfix", "-c", str(postfix_dir), "stop"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False,
            )  # fmt: skip
        for name in ("postfix", "dovecot", "sidecar"):
            if pid := run.pids.get(name):
                proc.stop_pid(pid)
        shutil.rmtree(notify_dir, ignore_errors=True)
        for name, pid in run.pids.items():
            assert not proc.pid_alive(pid), f"{name} ({pid}) still running"
            # the group got SIGTERM with its leader: a child (the milter, a socketmap worker) may take a moment
            end = time.monotonic() + 10
            while proc.group_members(pid) and time.monotonic() < end:
                time.sleep(0.05)
            assert not proc.group_members(pid), f"processes of {name} ({pid}) still running"


def _postmap(postfix_dir: Path, socketmap: Path, key: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["postmap", "-c", str(postfix_dir), "-q", key, f"socketmap:unix:{socketmap}:transport"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_login_through_deployed_stack(deployed: Deployment, running: Running) -> None:
    dep = deployed
    run_dir = dep.prefix / "run/autoport"
    # the sockets: the unit's user, the groups of their clients, 0660
    for name, group in (("auth.sock", "dovecot"), ("socketmap.sock", "postfix")):
        st = (run_dir / name).stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660, name
        assert (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name) == ("autoport", group), name

    alice, bob = dep.legacy.users[0], dep.legacy.users[1]
    # Postfix's view through the deployed socketmap: an account the legacy server still holds goes there
    p = _postmap(dep.prefix / "etc/postfix", run_dir / "socketmap.sock", bob.address)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"legacy:[{dep.legacy.host}]:{dep.legacy.smtp}"
    p = _postmap(dep.prefix / "etc/postfix", run_dir / "socketmap.sock", "someone@elsewhere.test")
    assert p.returncode == 1 and not p.stdout.strip(), (p.stdout, p.stderr)  # NOTFOUND: Postfix's default

    # a user logs in on the new host with the password the legacy server knows: checked there (pass-through)
    with imaplib.IMAP4(dep.host, dep.ports["imap"], timeout=30) as imap:
        typ, _ = imap.login(alice.login, alice.password)
        assert typ == "OK"
        typ, data = imap.select("INBOX", readonly=True)
        assert typ == "OK" and int(data[0] or 0) > 0
        imap.logout()
    status = subprocess.run(
        [str(dep.venv / "bin/autoport"), "--config", str(dep.config_file), "status", alice.address],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert re.search(r"\b(copying|cutover|migrated)\b", status.stdout), status.stdout

    # a wrong password is refused (the legacy server says no)
    with imaplib.IMAP4(dep.host, dep.ports["imap"], timeout=30) as imap, pytest.raises(imaplib.IMAP4.error):
        imap.login(bob.login, bob.password + "x")
