"""The configuration schema: defaults, unknown keys, wrong types, redaction, the example files."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness.cli import autoport

from sidecar import config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "autoport.toml"
    p.write_text(text)
    return p


def test_defaults_need_no_file_content(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, ""))
    assert cfg.legacy.imap_port == 143
    assert cfg.store.url.startswith("sqlite:///")
    assert cfg.hash.scheme == "ARGON2ID"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[legacy]\nhots = 'x'\n", "unknown key 'legacy.hots'"),
        ("[legasy]\nhost = 'x'\n", "unknown section or key 'legasy'"),
        ("[legacy]\nimap_port = '143'\n", "key 'legacy.imap_port' must be an integer"),
        ("[legacy]\nimap_port = true\n", "key 'legacy.imap_port' must be an integer"),
        ("[legacy]\nimap_tls = 'ssl'\n", "key 'legacy.imap_tls' must be one of none, starttls, implicit"),
        ("[legacy]\ntls_verify = 'yes'\n", "key 'legacy.tls_verify' must be true or false"),
        ("[legacy]\nverify_with = ['imap', 'ldap']\n", "key 'legacy.verify_with' has unknown protocol 'ldap'"),
        ("[mail]\ndomains = 'example.org'\n", "key 'mail.domains' must be a list of strings"),
        ("[store]\nurl = 'mysql://x'\n", "key 'store.url' must start with sqlite:/// or postgresql://"),
        ("[store]\nurl = 'postgresql://u:secret@h/db'\n", "key 'store.url' must not carry a password"),
        ("[limits]\ncopy_concurrency = -1\n", "key 'limits.copy_concurrency' must not be negative"),
        ("[limits]\ncopy_connections = 0\n", "key 'limits.copy_connections' must be 1..16, not 0"),
        ("[log]\ndestination = 'file:relative'\n", "key 'log.destination' must be stderr, syslog or file:/PATH"),
        ("legacy = 3\n", "'legacy' must be a table"),
        ("[legacy\n", "TOML syntax error"),
    ],
)
def test_mistakes_name_the_key_and_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert message in str(e.value)
    assert str(path) in str(e.value)
    assert "secret" not in str(e.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.toml")


def test_render_redacts_secrets_and_round_trips(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[legacy]\nadmin_user = 'admin'\nadmin_password = 'Sup3r-Secret'\n[dashboard]\ntoken = 'tok-123'\n",
    )
    cfg = config.load(path)
    text = config.render(cfg)
    assert "Sup3r-Secret" not in text and "tok-123" not in text
    assert config.REDACTED in text
    # every key carries its comment, and the rendered file loads back to the same values (secrets aside)
    again = config.load(write(tmp_path, config.render(cfg, redact=False).replace("\n", "\n", 1)))
    assert config.as_dict(again) == config.as_dict(cfg)
    assert config.secrets(cfg) == ["Sup3r-Secret", "tok-123"]


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_examples_load(example: Path) -> None:
    cfg = config.load(example)
    assert cfg.mail.domains


def test_cli_config_command_prints_effective_config(tmp_path: Path) -> None:
    path = write(tmp_path, "[legacy]\nhost = '127.0.0.9'\nadmin_password = 'hunter2hunter2'\n")
    p = autoport(path, "config")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert 'host = "127.0.0.9"' in out
    assert "hunter2hunter2" not in out


def test_cli_config_error_exit_code(tmp_path: Path) -> None:
    path = write(tmp_path, "[legacy]\nport = 1\n")
    p = autoport(path, "config")
    assert p.returncode == 2
    assert "unknown key 'legacy.port'" in p.stderr and str(path) in p.stderr
