"""Dovecot 2.4 fragments (dovecot/2.4/): chosen from the Dovecot version, rendered with the same variables as
the 2.3 set, valid for Debian 13's doveconf, and free of the 2.3 syntax 2.4 refuses."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from harness.debian13 import root_or_skip

from sidecar import config
from sidecar.lab import debroot, tlsgen
from sidecar.mta import render

ROOT = Path(__file__).resolve().parents[2]


def _cfg(url: str = "sqlite:////srv/autoport/state.db", **target: str) -> config.Config:
    return config.from_dict(
        {
            "mail": {"domains": ["example.test"]},
            "store": {"url": url},
            "legacy": {"host": "legacy.example.test", "smtp_port": 25},
            "target": {"dovecot_version": "2.4", **target},
        }
    )


def _vars(work: Path, cfg: config.Config) -> dict[str, str]:
    cert = tlsgen.issue_cert(tlsgen.ensure_ca(work / "tls"), "mx.example.test")
    return render.dovecot_vars(cfg, queue_directory=str(work / "queue")) | {
        "dovecot_dir": str(work / "dovecot"),
        "ssl_cert": str(cert.cert_file),
        "ssl_key": str(cert.key_file),
    }


@pytest.mark.parametrize(
    ("version", "series"),
    [("2.3.19.1 (9b53102964)", "2.3"), ("2.4.1-4 (7d8c0e5759)", "2.4"), ("2.4.2", "2.4"), ("2.5.0", "2.4")],
)
def test_series_from_the_version_string(version: str, series: str) -> None:
    assert render.dovecot_series(version) == series


@pytest.mark.parametrize("version", ["2.2.36", "dovecot", ""])
def test_unsupported_or_unreadable_version_is_an_error(version: str) -> None:
    with pytest.raises(render.RenderError):
        render.dovecot_series(version)


def test_the_installed_dovecot_is_detected_and_the_config_key_overrides_it() -> None:
    out = subprocess.run(["dovecot", "--version"], capture_output=True, text=True, check=True).stdout
    assert render.dovecot_vars(_cfg(dovecot_version=""))["dovecot_series"] == render.dovecot_series(out)
    assert render.dovecot_vars(_cfg())["dovecot_series"] == "2.4"
    assert render.dovecot_vars(_cfg(dovecot_version="2.3.19"))["dovecot_series"] == "2.3"


def test_the_23_set_is_unchanged() -> None:
    names = render.dovecot_templates("sqlite", series="2.3")
    assert names["dovecot.conf"] == "dovecot/dovecot.conf.j2"
    assert "autoport-passdb.lua" not in names
    assert all(not t.startswith("dovecot/2.4/") for t in names.values())


def test_24_files_carry_no_23_syntax(work: Path) -> None:
    conf = work / "dovecot"
    render.render_dovecot(conf, _vars(work, _cfg()), validate=False)
    files = {p.relative_to(conf).as_posix(): p.read_text() for p in conf.rglob("*") if p.is_file()}
    assert "autoport-passdb.lua" in files and "dovecot-sql.conf.ext" not in files
    for name, text in files.items():
        if name.endswith(".lua") or name.startswith("."):
            continue
        body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        # 2.4 has no one-letter variables, no mail_location, no checkpassword, no args= for sql
        assert not re.search(r"%[A-Za-z]", body.replace("%{", "")), name
        for gone in ("mail_location", "driver = checkpassword", "args =", "disable_plaintext_auth", "ssl_cert ="):
            assert gone not in body, (name, gone)
    assert files["dovecot.conf"].index("dovecot_config_version") < files["dovecot.conf"].index("protocols")
    auth = files["conf.d/10-auth.conf"]
    assert auth.index("passdb sql") < auth.index("passdb autoport_deny") < auth.index("passdb autoport {")
    assert "auth_allow_cleartext = no" in auth  # production default: 2.3's disable_plaintext_auth = yes


def test_lua_script_asks_the_configured_socket_and_never_logs(work: Path) -> None:
    cfg = _cfg(**{})
    cfg.sockets.auth = "/run/autoport/auth.sock"
    conf = work / "dovecot"
    render.render_dovecot(conf, _vars(work, cfg), validate=False)
    lua = (conf / "autoport-passdb.lua").read_text()
    assert 'local SOCKET = "/run/autoport/auth.sock"' in lua
    assert '"AUTH1", user, pass, service, rip, lip' in lua
    # nothing derived from the password reaches a log call or an error string
    for line in lua.splitlines():
        if "log" in line or "INTERNAL_FAILURE," in line:
            assert "pass" not in line.replace("PASSDB", "").replace("password", ""), line


def test_finalized_24_has_the_sql_passdb_only(work: Path) -> None:
    conf = work / "dovecot"
    render.render_dovecot(conf, _vars(work, _cfg()) | {"autoport_finalized": "yes"}, validate=False)
    auth = (conf / "conf.d" / "10-auth.conf").read_text()
    assert "passdb sql" in auth and "driver = lua" not in auth and "autoport_deny" not in auth


def test_pgsql_parameters_block() -> None:
    block = render.pgsql_parameters_block("postgresql://autoport@db.example.test:5433/autoport?sslmode=require")
    assert block.splitlines() == [
        "    host = db.example.test", "    port = 5433", "    dbname = autoport", "    user = autoport",
        "    sslmode = require",
    ]  # fmt: skip


@pytest.mark.parametrize("url", ["sqlite:///STATE", "postgresql://autoport@127.0.0.1:5432/autoport"])
def test_24_set_passes_the_debian13_doveconf(url: str) -> None:
    root = root_or_skip()
    work = debroot.new_lab_dir(root, "r24-")
    old_path = os.environ["PATH"]
    try:
        bin_dir = debroot.write_wrappers(root, work / "bin")
        os.environ["PATH"] = f"{bin_dir}:{old_path}"
        state = work / "state.db"
        state.touch()
        cfg = _cfg(url.replace("STATE", str(state)))
        warnings = render.render_dovecot(work / "dovecot", _vars(work, cfg))
        assert warnings == []
        out = subprocess.run(
            ["chroot", str(root), "doveconf", "-c", str(work / "dovecot" / "dovecot.conf"), "-n"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert "driver = lua" in out.stdout
    finally:
        os.environ["PATH"] = old_path
        shutil.rmtree(work, ignore_errors=True)
