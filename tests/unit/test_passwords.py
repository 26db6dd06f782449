"""Dovecot-compatible hashes: Dovecot itself (doveadm pw -t) must accept what we store."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from sidecar.auth.passwords import HashError, hash_password, verify_password
from sidecar.config import HashConfig

pytestmark = pytest.mark.skipif(shutil.which("doveadm") is None, reason="doveadm (dovecot-core) not installed")

PASSWORDS = ["correct horse battery staple", "Sésame, ouvre-toi", 'q"uo\\te', "caf\udce9"]  # last: Latin-1 byte


def doveadm_verifies(stored: str, password: str) -> bool:
    # the password goes on stdin (doveadm asks for it when -p is absent and there is no tty), never argv
    raw = password.encode("utf-8", "surrogateescape") + b"\n"
    p = subprocess.run(
        ["doveadm", "pw", "-t", stored], input=raw, capture_output=True, start_new_session=True, check=False
    )
    return p.returncode == 0 and b"(verified)" in p.stdout


@pytest.mark.parametrize("scheme", ["ARGON2ID", "SHA512-CRYPT", "BLF-CRYPT"])
@pytest.mark.parametrize("password", PASSWORDS, ids=["ascii", "utf8", "quotes", "latin1"])
def test_dovecot_accepts_our_hash(scheme: str, password: str) -> None:
    stored = hash_password(password, HashConfig(scheme=scheme))
    assert stored.startswith("{" + scheme + "}")
    assert doveadm_verifies(stored, password)
    assert not doveadm_verifies(stored, password + "x")
    assert verify_password(password, stored)
    assert not verify_password(password + "x", stored)


def test_argon2_parameters_come_from_the_config() -> None:
    cfg = HashConfig(argon2_memory_kib=8192, argon2_time_cost=3, argon2_parallelism=2)
    stored = hash_password("pw-for-params", cfg)
    assert "$argon2id$v=19$m=8192,t=3,p=2$" in stored
    assert doveadm_verifies(stored, "pw-for-params")


def test_sha512_rounds_from_the_config() -> None:
    stored = hash_password("pw-rounds", HashConfig(scheme="SHA512-CRYPT", sha512_rounds=10000))
    assert stored.startswith("{SHA512-CRYPT}$6$rounds=10000$")
    assert doveadm_verifies(stored, "pw-rounds")


def test_salts_differ_and_the_password_is_not_in_the_hash() -> None:
    a = hash_password("same-password", HashConfig())
    b = hash_password("same-password", HashConfig())
    assert a != b
    assert "same-password" not in a


def test_unknown_scheme() -> None:
    with pytest.raises(HashError):
        hash_password("x", HashConfig(scheme="MD5"))
