"""The postfix/ and dovecot/ fragments render (SQLite and PostgreSQL variants) and pass Postfix's and
Dovecot's own checks; broken values are refused before they replace a live file."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sidecar import config
from sidecar.lab import tlsgen
from sidecar.mta import render

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = sorted((ROOT / "postfix").glob("*.j2")) + sorted((ROOT / "dovecot").rglob("*.j2"))


def _cfg(url: str) -> config.Config:
    return config.from_dict(
        {
            "mail": {"domains": ["example.test", "example.net"]},
            "store": {"url": url},
            "legacy": {"host": "legacy.example.test", "smtp_port": 25, "smtp_tls": "starttls"},
        }
    )


def _postfix_vars(work: Path, cfg: config.Config) -> dict[str, str]:
    (work / "queue").mkdir(exist_ok=True)
    data = work / "data"
    data.mkdir(exist_ok=True)
    shutil.chown(data, "postfix")
    return render.postfix_vars(cfg, myhostname="mx.example.test") | {
        "queue_directory": str(work / "queue"),
        "data_directory": str(data),
        # render_postfix creates the alias map when it is missing: in the test's directory, not the host's
        "alias_maps": f"hash:{work}/aliases/aliases",
    }


def _dovecot_vars(work: Path, cfg: config.Config) -> dict[str, str]:
    cert = tlsgen.issue_cert(tlsgen.ensure_ca(work / "tls"), "mx.example.test")
    return render.dovecot_vars(cfg, queue_directory=str(work / "queue")) | {
        "dovecot_dir": str(work / "dovecot"),
        "ssl_cert": str(cert.cert_file),
        "ssl_key": str(cert.key_file),
    }


def _postconf(conf: Path, *args: str) -> str:
    return subprocess.run(
        ["postconf", "-c", str(conf), *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout


def test_postfix_fragments_pass_postfix_check(work: Path) -> None:
    cfg = _cfg("sqlite:////var/lib/autoport/state.db")
    conf = work / "postfix"
    warnings = render.render_postfix(conf, _postfix_vars(work, cfg))
    assert warnings == []
    main = dict(
        line.split(" = ", 1)
        for line in _postconf(conf, "-n").splitlines()
        if " = " in line
    )  # fmt: skip
    assert main["transport_maps"] == "socketmap:unix:/run/autoport/socketmap.sock:transport"
    assert main["address_verify_transport_maps"] == "socketmap:unix:/run/autoport/socketmap.sock:verify"
    assert main["virtual_mailbox_domains"] == "example.test example.net"
    assert main["smtpd_reject_unlisted_recipient"] == "no"
    assert main["unverified_recipient_reject_code"] == "550"
    assert main["address_verify_poll_delay"] == "1s"
    assert "reject_unverified_recipient" in main["smtpd_recipient_restrictions"]
    assert main["milter_default_action"] == "accept"
    assert main["smtpd_sasl_type"] == "dovecot"
    assert main["virtual_transport"] == "legacy:[legacy.example.test]:25"
    services = _postconf(conf, "-M")
    assert re.search(r"^retry\s+unix\s+-\s+-\s+n\s+-\s+-\s+error$", services, re.M)
    legacy = re.search(r"^legacy\s+unix\s+-\s+-\s+n\s+-\s+8\s+smtp\s+(.*)$", services, re.M)
    assert legacy, services
    assert "smtp_tls_security_level=secure" in legacy[1]
    submission = re.search(r"^submission\s+inet\s.*$", services, re.M)
    assert submission and "smtpd_sasl_auth_enable=yes" in submission[0]
    # the staging directory used for validation is gone
    assert sorted(p.name for p in conf.iterdir()) == [render.VARIABLES_FILE, "main.cf", "master.cf"]


@pytest.mark.parametrize(
    ("url", "driver", "connect"),
    [
        ("sqlite:////var/lib/autoport/state.db", "sqlite", "/var/lib/autoport/state.db"),
        (
            "postgresql://autoport_dovecot@db.example.test:5433/autoport",
            "pgsql",
            "host=db.example.test port=5433 dbname=autoport user=autoport_dovecot",
        ),
    ],
)
def test_dovecot_fragments_pass_doveconf(work: Path, url: str, driver: str, connect: str) -> None:
    cfg = _cfg(url)
    conf = work / "dovecot"
    warnings = render.render_dovecot(conf, _dovecot_vars(work, cfg))
    assert warnings == []
    out, _ = render.check_dovecot(conf / "dovecot.conf")
    assert "protocols = imap pop3 lmtp sieve" in out
    assert "auth_username_format" not in out or "auth_username_format = %Lu" in out  # %Lu is the default
    assert "auth_mechanisms = plain login" in out
    assert "mail_home = /var/vmail/%d/%n" in out
    assert f"unix_listener {work}/queue/private/auth {{" in out
    assert f"unix_listener {work}/queue/private/dovecot-lmtp {{" in out
    assert "auth_debug = yes" not in out
    # the auth cache is on (issue 17; tests/unit/test_auth_cache_flush.py)
    assert "auth_cache_size = 10 M" in out and "auth_cache_negative_ttl = 5 mins" in out
    connect_file = (conf / "dovecot-sql-connect.conf.ext").read_text()
    assert f"driver = {driver}\n" in connect_file
    assert f"connect = {connect}\n" in connect_file
    for name in ("dovecot-sql.conf.ext", "dovecot-sql-deny.conf.ext"):
        assert f"!include {conf}/dovecot-sql-connect.conf.ext" in (conf / name).read_text()
    assert "FROM dovecot_deny WHERE login = '%u'" in (conf / "dovecot-sql-deny.conf.ext").read_text()


def test_missing_variable_is_an_error_naming_it(work: Path) -> None:
    variables = _postfix_vars(work, _cfg("sqlite:////x.db"))
    del variables["socketmap"]
    with pytest.raises(render.RenderError, match="socketmap"):
        render.render_postfix(work / "postfix", variables)
    assert not (work / "postfix" / "main.cf").exists()


def test_broken_postfix_value_leaves_live_files_alone(work: Path) -> None:
    conf = work / "postfix"
    good = _postfix_vars(work, _cfg("sqlite:////x.db"))
    render.render_postfix(conf, good)
    before = (conf / "main.cf").read_text()
    # not an interface address: Postfix refuses to start with it
    with pytest.raises(render.RenderError, match="inet_interfaces"):
        render.render_postfix(conf, good | {"inet_interfaces": "192.0.2.77", "myhostname": "other.test"})
    assert (conf / "main.cf").read_text() == before
    assert sorted(p.name for p in conf.iterdir()) == [render.VARIABLES_FILE, "main.cf", "master.cf"]


def test_broken_dovecot_value_leaves_live_files_alone(work: Path) -> None:
    conf = work / "dovecot"
    good = _dovecot_vars(work, _cfg("sqlite:////x.db"))
    render.render_dovecot(conf, good)
    before = (conf / "conf.d" / "10-ssl.conf").read_text()
    with pytest.raises(render.RenderError, match="ssl"):
        render.render_dovecot(conf, good | {"ssl": "sometimes"})
    assert (conf / "conf.d" / "10-ssl.conf").read_text() == before
    assert not list(conf.glob(".autoport-staging-*"))


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: str(p.relative_to(ROOT)))
def test_templates_stay_ansible_compatible(template: Path) -> None:
    """Plain {{ name }} substitutions and {% if %} only, so Ansible's template module renders them alike."""
    text = template.read_text()
    for expr in re.findall(r"\{\{(.*?)\}\}", text):
        assert re.fullmatch(r"\s*[a-z_][a-z0-9_]*\s*", expr), f"not a plain variable: {{{{{expr}}}}}"
    for stmt in re.findall(r"\{%(.*?)%\}", text):
        assert re.fullmatch(r"\s*(if [a-z_][a-z0-9_]*|else|endif)\s*", stmt), f"not a simple if: {stmt}"
    comment = "-- " if template.name.endswith(".lua.j2") else "# "
    assert text.startswith(f"{comment}autoport: "), "each fragment says what it is in its first line"


def test_pgsql_connect_from_url() -> None:
    assert render.pgsql_connect("postgresql://dovecot@/autoport?host=/run/postgresql") == (
        "host=/run/postgresql dbname=autoport user=dovecot"
    )
    assert render.pgsql_connect("postgres://u@h/d", passfile="/etc/dovecot/pgpass") == (
        "host=h dbname=d user=u passfile=/etc/dovecot/pgpass"
    )
    with pytest.raises(render.RenderError, match="password"):
        render.pgsql_connect("postgresql://u:secret@h/d")


def test_write_atomic_replaces_whole_file_with_mode(work: Path) -> None:
    f = work / "sub" / "file.cf"
    render.write_atomic(f, "one\n", 0o640)
    render.write_atomic(f, "two\n", 0o640)
    assert f.read_text() == "two\n"
    assert f.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in f.parent.iterdir()] == ["file.cf"]


def test_lmtp_socket_follows_the_local_transport() -> None:
    assert render.lmtp_socket_path("lmtp:unix:private/dovecot-lmtp", "/var/spool/postfix") == (
        "/var/spool/postfix/private/dovecot-lmtp"
    )
    with pytest.raises(render.RenderError):
        render.lmtp_socket_path("lmtp:inet:127.0.0.1:24", "/var/spool/postfix")


def test_dovecot_namespace_is_the_legacy_one(work: Path) -> None:
    """[mail] namespace_* = auto renders the legacy server's NAMESPACE; explicit keys win over it."""
    cfg = _cfg("sqlite:////x.db")
    conf = work / "dovecot"
    render.render_dovecot(conf, _dovecot_vars(work, cfg) | _ns_vars(cfg, ("INBOX.", ".")))
    out, _ = render.check_dovecot(conf / "dovecot.conf")
    block = re.search(r"^namespace inbox \{\n(.*?)^\}", out, re.M | re.S)
    assert block and "  prefix = INBOX.\n" in block[1] and "  separator = .\n" in block[1]
    explicit = config.from_dict({"mail": {"namespace_prefix": "", "namespace_separator": "/"}})
    assert _ns_vars(explicit, ("INBOX.", ".")) == {"namespace_prefix": "", "namespace_separator": "/"}


def _ns_vars(cfg: config.Config, legacy_ns: tuple[str, str]) -> dict[str, str]:
    v = render.dovecot_vars(cfg, legacy_namespace=legacy_ns)
    return {k: v[k] for k in ("namespace_prefix", "namespace_separator")}


def test_a_record_from_before_the_added_variables_still_renders(work: Path) -> None:
    """finalize renders a recorded configuration again: one recorded before namespace_* existed gets the old
    values (what the templates did then: no auth cache either), while a fresh render without them is still an error."""
    cfg = _cfg("sqlite:////x.db")
    old = {k: v for k, v in _dovecot_vars(work, cfg).items() if k not in render.ADDED_DOVECOT_VARIABLES}
    with pytest.raises(render.RenderError, match=r"namespace_|auth_cache_"):
        render.render_dovecot(work / "dovecot", old)
    render.render_dovecot(work / "dovecot", {**render.ADDED_DOVECOT_VARIABLES, **old})
    pf_old = {k: v for k, v in _postfix_vars(work, cfg).items() if k not in render.ADDED_POSTFIX_VARIABLES}
    assert render.render_postfix(work / "postfix", {**render.ADDED_POSTFIX_VARIABLES, **pf_old}) == []
