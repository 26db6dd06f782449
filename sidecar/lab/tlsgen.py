"""A lab certificate authority and server certificates, made with the `openssl` command line tool.

The lab's servers (legacy and target) present certificates signed by one lab CA, so clients can be run with full
verification against `ca_file`, exactly as against a real server. The `cryptography` package is not a dependency of
autoport, and the `openssl` CLI is on every machine that runs Postfix and Dovecot, so we drive the CLI.

    ca = ensure_ca(lab_dir / "tls")                         # reuses an existing CA in that directory
    cert = issue_cert(ca, "legacy.lab.test", ips=["127.0.0.2"])
    cert.cert_file, cert.key_file, ca.cert_file             # PEM paths

Keys are P-256 (fast to generate); key files are 0600 (read by Dovecot and Postfix as root before they drop
privileges). Certificates are valid for 10 years: the lab may be kept around.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sidecar.lab.proc import run

CA_NAME = "autoport lab CA"
_DAYS = "3650"
_SAFE = re.compile(r"^[A-Za-z0-9.-]+$")


@dataclass(frozen=True)
class LabCA:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class ServerCert:
    name: str
    cert_file: Path
    key_file: Path


def _newkey(key_file: Path) -> None:
    run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key_file)],
        what="openssl genpkey",
    )
    os.chmod(key_file, 0o600)


def ensure_ca(tls_dir: Path) -> LabCA:
    """The lab CA in tls_dir (ca.pem, ca.key), created when missing."""
    tls_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o755)  # noqa: S103 - certificates are public; keys are 0600
    ca = LabCA(tls_dir / "ca.pem", tls_dir / "ca.key")
    if ca.cert_file.exists() and ca.key_file.exists():
        return ca
    _newkey(ca.key_file)
    run(
        [
            "openssl", "req", "-x509", "-new", "-key", str(ca.key_file), "-out", str(ca.cert_file),
            "-days", _DAYS, "-subj", f"/CN={CA_NAME}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash",
        ],
        what="openssl req (lab CA)",
    )  # fmt: skip
    os.chmod(ca.cert_file, 0o644)
    return ca


def issue_cert(ca: LabCA, name: str, *, ips: list[str] | tuple[str, ...] = ()) -> ServerCert:
    """A server certificate for DNS name `name` (and the given IP addresses), signed by the lab CA.

    Written next to the CA as NAME.pem / NAME.key; an existing pair is reused.
    """
    if not _SAFE.match(name):
        raise ValueError(f"not a plain DNS name: {name!r}")
    tls_dir = ca.cert_file.parent
    out = ServerCert(name, tls_dir / f"{name}.pem", tls_dir / f"{name}.key")
    if out.cert_file.exists() and out.key_file.exists():
        return out
    csr = tls_dir / f"{name}.csr"
    ext = tls_dir / f"{name}.ext"
    san = ",".join([f"DNS:{name}", *(f"IP:{ip}" for ip in ips)])
    ext.write_text(
        f"subjectAltName={san}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    _newkey(out.key_file)
    run(["openssl", "req", "-new", "-key", str(out.key_file), "-out", str(csr), "-subj", f"/CN={name}"],
        what="openssl req (csr)")  # fmt: skip
    run(
        [
            "openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca.cert_file), "-CAkey", str(ca.key_file),
            "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", _DAYS,
            "-extfile", str(ext), "-out", str(out.cert_file),
        ],
        what="openssl x509 (sign)",
    )  # fmt: skip
    os.chmod(out.cert_file, 0o644)
    csr.unlink()
    ext.unlink()
    return out
