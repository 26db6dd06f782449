"""`autoport inventory --from ldap` against a real slapd on loopback: accounts in the directory block
`finalize --check` until each is migrated or excluded; a wrong bind is refused without the password showing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.labs import make_lab_dir

from sidecar import config
from sidecar.lab.slapd import TLS_NAME, Slapd
from sidecar.states import State
from sidecar.store import open_store

AUTOPORT = str(Path(sys.executable).parent / "autoport")
HASH = "{SHA512-CRYPT}$6$abc$def"
HOST = "127.0.0.61"


@pytest.fixture(scope="module")
def directory() -> Iterator[Slapd]:
    d = make_lab_dir("ap-ldap-")
    slapd = Slapd(d / "slapd", host=HOST, suffix="dc=example,dc=test")
    try:
        slapd.start(
            [("alice", "alice@example.test"), ("bob", "bob@example.test"), ("carol", "carol@example.test"),
             ("xavier", "xavier@elsewhere.test")],
            no_mail=("printer",),
        )  # fmt: skip
        yield slapd
    finally:
        slapd.stop()
        subprocess.run(["rm", "-rf", str(d)], check=False)


def write_config(tmp_path: Path, d: Slapd, *, password: str | None = None, url: str = "", name: str = TLS_NAME,
                 starttls: bool = True) -> Path:  # fmt: skip
    p = tmp_path / "autoport.toml"
    p.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path}/store/state.db"\n'
        '[mail]\ndomains = ["example.test"]\n'
        f'[ldap]\nurl = "{url or d.url}"\nstarttls = {"true" if starttls else "false"}\n'
        f'ca_file = "{d.ca_file}"\ntls_server_name = "{name}"\nbind_dn = "{d.bind_dn}"\n'
        f'bind_password = "{password or d.bind_password}"\nbase_dn = "{d.people_dn}"\n'
    )
    return p


def autoport(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AUTOPORT, "--config", str(cfg), *args], capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip


def test_directory_accounts_block_finalize_until_migrated_or_excluded(directory: Slapd, tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path, directory)
    store = open_store(config.load(cfg_path).store.url)
    store.init()

    p = autoport(cfg_path, "inventory", "--from", "ldap")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ldap: 3 account(s) (3 new, 0 no longer listed)" in p.stdout
    assert "xavier@elsewhere.test" in p.stdout  # another domain: skipped, and said so
    inv = {(e.name, e.source): e.detail for e in store.inventory("account")}
    assert inv == {
        ("alice@example.test", "ldap"): f"uid=alice,{directory.people_dn}",
        ("bob@example.test", "ldap"): f"uid=bob,{directory.people_dn}",
        ("carol@example.test", "ldap"): f"uid=carol,{directory.people_dn}",
    }

    p = autoport(cfg_path, "finalize", "--check")
    assert p.returncode == 1
    assert "3 legacy account(s) in the inventory were never seen here" in p.stdout
    for who in ("alice", "bob", "carol"):
        assert f"{who}@example.test" in p.stdout

    # alice migrates (as a login would move her), bob is excluded; carol still blocks
    for s in (State.COPYING, State.CUTOVER, State.MIGRATED):
        store.transition("alice@example.test", s)
    store.set_password_hash("alice@example.test", HASH)
    assert autoport(cfg_path, "exclude", "bob@example.test", "--reason", "mailbox exported to PST").returncode == 0
    p = autoport(cfg_path, "finalize", "--check")
    assert p.returncode == 1 and "carol@example.test" in p.stdout
    assert "alice@example.test" not in p.stdout and "bob@example.test" not in p.stdout
    assert autoport(cfg_path, "exclude", "carol", "--reason", "left").returncode == 0
    p = autoport(cfg_path, "finalize", "--check")
    assert p.returncode == 0, p.stdout
    store.close()


def test_wrong_bind_is_refused_without_showing_the_password(directory: Slapd, tmp_path: Path) -> None:
    wrong = "Wr0ng-bind-" + directory.bind_password
    cfg_path = write_config(tmp_path, directory, password=wrong)
    open_store(config.load(cfg_path).store.url).init()
    p = autoport(cfg_path, "inventory", "--from", "ldap")
    assert p.returncode == 1
    assert "bind as" in p.stderr and "refused" in p.stderr and "invalidCredentials" in p.stderr
    assert wrong not in p.stdout + p.stderr
    assert directory.bind_password not in p.stdout + p.stderr
    p = autoport(cfg_path, "config")
    assert wrong not in p.stdout and "********" in p.stdout


def test_ldaps_and_starttls_verify_the_directory_certificate(directory: Slapd, tmp_path: Path) -> None:
    for n, url in enumerate((directory.url, directory.ldaps_url)):
        d = tmp_path / str(n)
        d.mkdir()
        cfg_path = write_config(d, directory, url=url)
        open_store(config.load(cfg_path).store.url).init()
        p = autoport(cfg_path, "inventory", "--from", "ldap")
        assert p.returncode == 0, p.stdout + p.stderr
        assert "ldap: 3 account(s)" in p.stdout
        # the certificate names ldap.lab.test, not another name: refused before any bind
        cfg_path = write_config(d, directory, url=url, name="other.lab.test")
        p = autoport(cfg_path, "inventory", "--from", "ldap")
        assert p.returncode == 1 and "certificate" in p.stderr.lower(), p.stdout + p.stderr
    # without TLS the directory refuses the simple bind (it requires TLS for it)
    cfg_path = write_config(tmp_path, directory, starttls=False)
    open_store(config.load(cfg_path).store.url).init()
    p = autoport(cfg_path, "inventory", "--from", "ldap")
    assert p.returncode == 1 and "confidentiality" in p.stderr.lower(), p.stderr

