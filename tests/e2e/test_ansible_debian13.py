"""The Ansible postfix and dovecot roles on Debian 13 (Postfix 3.10, Dovecot 2.4), run inside the Debian 13 root.

The root's own ansible-core (trixie's apt) runs a playbook of the two roles with `-c local` under `chroot ROOT`
into a prefix (autoport_prefix) inside the root, services left alone, the autoport role's defaults loaded as
variables. Checked: the roles pick Dovecot 2.4's templates from `dovecot --version` (Lua passdb), the result
passes 2.4's `doveconf -n` and equals what sidecar.mta.render makes of the same variables, and a second run
reports changed=0. (The autoport role itself, which builds the sidecar's virtualenv from PyPI, and the end-to-end
login are covered on Debian 12 by test_ansible.py and on the 2.4 stack by test_dovecot24.py.)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.debian13 import remove_lab, root_or_skip

from sidecar import config
from sidecar.lab import debroot, tlsgen
from sidecar.mta import render

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = ("ansible", "postfix", "dovecot", "deploy")
RECAP = re.compile(r"^localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)
PLAY = """\
- name: Postfix and Dovecot roles on Debian 13
  hosts: all
  gather_facts: false
  vars_files:
    - {repo}/ansible/roles/autoport/defaults/main.yml
  roles:
    - postfix
    - dovecot
"""


def _recap(out: str) -> dict[str, int]:
    m = RECAP.search(out)
    assert m, out[-3000:]
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, m.groups()), strict=True))


def _playbook(root: Path, work: Path) -> str:
    argv = [
        "chroot", str(root), "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
        "LC_ALL=C.UTF-8", f"ANSIBLE_CONFIG={work}/repo/ansible/ansible.cfg",
        f"ANSIBLE_ROLES_PATH={work}/repo/ansible/roles", f"ANSIBLE_LOCAL_TEMP={work}/tmp",
        "ANSIBLE_NOCOLOR=1", "ansible-playbook", "-i", "localhost,", "-c", "local",
        "-e", f"@{work}/vars.json", f"{work}/play.yml",
    ]  # fmt: skip
    p = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def deployed() -> Iterator[dict[str, Any]]:
    root = root_or_skip()
    work = debroot.new_lab_dir(root, "ans13-")
    try:
        for name in SNAPSHOT:
            shutil.copytree(REPO / name, work / "repo" / name, ignore=shutil.ignore_patterns("__pycache__"))
        (work / "tmp").mkdir()
        cert = tlsgen.issue_cert(tlsgen.ensure_ca(work / "tls"), "mx.example.test")
        prefix = work / "p"
        variables: dict[str, Any] = {
            "ansible_python_interpreter": "/usr/bin/python3",
            "autoport_prefix": str(prefix),
            "autoport_manage_services": False,
            "autoport_repo": str(work / "repo"),
            "autoport_domains": ["example.test"],
            "autoport_legacy": {"host": "127.0.0.2", "tls_server_name": "legacy.example.test"},
            "autoport_tls_cert_file": str(cert.cert_file),
            "autoport_tls_key_file": str(cert.key_file),
        }
        (work / "vars.json").write_text(json.dumps(variables, indent=1))
        (work / "play.yml").write_text(PLAY.format(repo=work / "repo"))
        # the roles validate Postfix on a terminal (`script`): the chroot needs the host's /dev/pts, for the
        # playbook runs only (the lab itself needs no mount)
        pts = root / "dev" / "pts"
        subprocess.run(["mount", "--bind", "/dev/pts", str(pts)], check=True, capture_output=True, timeout=30)
        try:
            runs = [_playbook(root, work), _playbook(root, work)]
        finally:
            subprocess.run(["umount", str(pts)], check=False, capture_output=True, timeout=30)
        yield {"root": root, "work": work, "prefix": prefix, "runs": runs, "cert": cert}
    finally:
        remove_lab(work)


def test_first_run_deploys_and_second_changes_nothing(deployed: dict[str, Any]) -> None:
    first, second = (_recap(out) for out in deployed["runs"])
    assert first["failed"] == 0 and first["changed"] > 0
    assert second["changed"] == 0, "\n".join(
        line for line in deployed["runs"][1].splitlines() if line.startswith(("TASK", "changed"))
    )


def test_dovecot_24_templates_were_chosen_and_validate(deployed: dict[str, Any]) -> None:
    conf = deployed["prefix"] / "etc" / "dovecot"
    assert (conf / "autoport-passdb.lua").is_file()
    assert not (conf / "dovecot-sql.conf.ext").exists()
    auth = (conf / "conf.d" / "10-auth.conf").read_text()
    assert "driver = lua" in auth and "auth_allow_cleartext = no" in auth
    p = subprocess.run(
        ["chroot", str(deployed["root"]), "doveconf", "-c", str(conf / "dovecot.conf"), "-n"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    assert "dovecot_config_version = 2.4.0" in p.stdout


def test_deployed_lua_passdb_equals_render(deployed: dict[str, Any]) -> None:
    prefix = deployed["prefix"]
    cfg = config.from_dict(
        {
            "mail": {"domains": ["example.test"]},
            "store": {"url": f"sqlite:///{prefix}/var/lib/autoport/state.db"},
            "legacy": {"host": "127.0.0.2", "tls_server_name": "legacy.example.test"},
            "sockets": {"auth": f"{prefix}/run/autoport/auth.sock"},
            "target": {"dovecot_version": "2.4", "mail_root": f"{prefix}/var/vmail"},
        }
    )
    lua = (prefix / "etc" / "dovecot" / "autoport-passdb.lua").read_text()
    expect = render.render_template(
        "dovecot/2.4/autoport-passdb.lua.j2", render.dovecot_vars(cfg), root=REPO
    )
    assert lua == expect
