"""Dovecot-compatible password hashes for the verified passwords the store keeps (never the password itself).

    {ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$SALT$HASH   argon2-cffi, hash.argon2_* parameters
    {SHA512-CRYPT}$6$SALT$HASH                           libxcrypt (the system's libcrypt.so.1) via ctypes
    {BLF-CRYPT}$2b$10$...                                libxcrypt

More (the reasons and limits behind this module): docs/modules.md, sidecar/auth/passwords.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hmac

import argon2

from sidecar.config import HashConfig

SCHEMES = ("ARGON2ID", "SHA512-CRYPT", "BLF-CRYPT")
BCRYPT_COST = 10  # log2 rounds; Dovecot's own default (5) is too cheap
_CRYPT_DATA_SIZE = 32768  # sizeof(struct crypt_data) in libxcrypt


class HashError(Exception):
    """The password cannot be hashed (unknown scheme, libcrypt missing or refusing)."""


def _raw(password: str) -> bytes:
    raw = password.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise HashError("password contains NUL")
    return raw


@functools.cache
def _libcrypt() -> ctypes.CDLL:
    name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise HashError(f"libcrypt (libxcrypt) not available: {e}") from None
    lib.crypt_rn.restype = ctypes.c_char_p
    lib.crypt_rn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    lib.crypt_gensalt_rn.restype = ctypes.c_char_p
    lib.crypt_gensalt_rn.argtypes = [
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
    ]
    return lib


def _crypt(password: str, setting: bytes) -> str:
    lib = _libcrypt()
    data = ctypes.create_string_buffer(_CRYPT_DATA_SIZE)
    out: bytes | None = lib.crypt_rn(_raw(password), setting, data, _CRYPT_DATA_SIZE)
    if not out or out.startswith(b"*"):
        raise HashError("libcrypt refused the setting")
    return out.decode("ascii")


def _gensalt(prefix: bytes, count: int) -> bytes:
    lib = _libcrypt()
    buf = ctypes.create_string_buffer(256)
    out: bytes | None = lib.crypt_gensalt_rn(prefix, count, None, 0, buf, len(buf))
    if not out:
        raise HashError(f"libcrypt cannot make a {prefix.decode()} salt")
    return bytes(out)


def _argon2(cfg: HashConfig) -> argon2.PasswordHasher:
    return argon2.PasswordHasher(
        time_cost=cfg.argon2_time_cost,
        memory_cost=cfg.argon2_memory_kib,
        parallelism=cfg.argon2_parallelism,
        hash_len=32,
        salt_len=16,
        type=argon2.Type.ID,
    )


def hash_password(password: str, cfg: HashConfig) -> str:
    """The Dovecot passdb value ("{SCHEME}...") for password under the configured scheme."""
    if cfg.scheme == "ARGON2ID":
        return "{ARGON2ID}" + str(_argon2(cfg).hash(_raw(password)))
    if cfg.scheme == "SHA512-CRYPT":
        return "{SHA512-CRYPT}" + _crypt(password, _gensalt(b"$6$", cfg.sha512_rounds))
    if cfg.scheme == "BLF-CRYPT":
        return "{BLF-CRYPT}" + _crypt(password, _gensalt(b"$2b$", BCRYPT_COST))
    raise HashError(f"unknown scheme {cfg.scheme!r}")


def verify_password(password: str, stored: str) -> bool:
    """Whether password matches a value made by hash_password (the schemes above only)."""
    scheme, _, encoded = stored.partition("}")
    scheme = scheme.lstrip("{")
    if scheme == "ARGON2ID":
        try:
            return bool(argon2.PasswordHasher().verify(encoded, _raw(password)))
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            raise HashError("malformed ARGON2ID hash") from None
    if scheme in ("SHA512-CRYPT", "BLF-CRYPT"):
        return hmac.compare_digest(_crypt(password, encoded.encode("ascii")), encoded)
    raise HashError(f"unknown scheme {scheme!r}")
