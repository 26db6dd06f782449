"""A throwaway OpenLDAP directory on loopback (Debian's slapd), for `autoport inventory --from ldap` tests.

    with Slapd(work_dir, host="127.0.0.5", suffix="dc=example,dc=test") as d:
        d.add_people([("alice", "alice@example.test"), ("bob", "bob@example.test")])
        d.url, d.bind_dn, d.bind_password      # a read-only service account; anonymous binds see nothing

slapd runs in the foreground (`-d 0`, its own session) from a generated slapd.conf (`-f`), an mdb database in
work_dir, listening on ldap://HOST:PORT (StartTLS offered) and ldaps://HOST:TLS_PORT with a certificate for
TLS_NAME from the lab CA (d.ca_file), like a directory reached by a name that is not its address; simple binds
need TLS (`security simple_bind=128`). stop() ends it by pid. The service account may read people's
entries; the anonymous user may only bind, so a wrong or missing bind shows as an empty or refused search.
Entries are loaded with slapadd before slapd starts (offline, no rootpw needed).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path
from types import TracebackType

from sidecar.lab import proc, tlsgen
from sidecar.lab.proc import LabError

SCHEMAS = ("core", "cosine", "inetorgperson")
SERVICE_CN = "autoport"
TLS_NAME = "ldap.lab.test"


def _ssha(password: str) -> str:
    p = subprocess.run(["slappasswd", "-n", "-T", "/dev/stdin"], input=password, capture_output=True, text=True,
                       timeout=30, check=False)  # fmt: skip
    if p.returncode != 0 or not p.stdout.startswith("{SSHA}"):
        raise LabError(f"slappasswd failed: {p.stderr.strip()[-300:]}")
    return p.stdout.strip()


class Slapd:
    def __init__(self, work_dir: Path, *, host: str = "127.0.0.1", suffix: str = "dc=example,dc=test") -> None:
        self.dir = work_dir
        self.host = host
        self.suffix = suffix
        self.port = 0
        self.tls_port = 0
        self.pid = 0
        self.ca_file = work_dir / "tls" / "ca.pem"
        self.bind_dn = f"cn={SERVICE_CN},ou=services,{suffix}"
        self.bind_password = secrets.token_urlsafe(12)
        self.people: list[tuple[str, str]] = []
        self.log = work_dir / "slapd.log"

    @property
    def url(self) -> str:
        return f"ldap://{self.host}:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{self.host}:{self.tls_port}"

    @property
    def people_dn(self) -> str:
        return f"ou=people,{self.suffix}"

    def _conf(self) -> str:
        d = self.dir
        includes = "".join(f"include /etc/ldap/schema/{s}.schema\n" for s in SCHEMAS)
        return (
            f"{includes}"
            f"pidfile {d}/slapd.pid\nargsfile {d}/slapd.args\n"
            "modulepath /usr/lib/ldap\nmoduleload back_mdb\n"
            "database mdb\n"
            f'suffix "{self.suffix}"\n'
            f"directory {d}/db\n"
            "maxsize 10485760\n"
            f"TLSCACertificateFile {self.ca_file}\n"
            f"TLSCertificateFile {d}/tls/{TLS_NAME}.pem\nTLSCertificateKeyFile {d}/tls/{TLS_NAME}.key\n"
            "security simple_bind=128\n"
            f'access to * by dn.exact="{self.bind_dn}" read by anonymous auth by * none\n'
        )

    def _ldif(self, people: list[tuple[str, str]], *, no_mail: tuple[str, ...] = ()) -> str:
        dc = self.suffix.split(",")[0].split("=")[1]
        out = [
            f"dn: {self.suffix}\nobjectClass: dcObject\nobjectClass: organization\no: lab\ndc: {dc}\n",
            f"dn: ou=services,{self.suffix}\nobjectClass: organizationalUnit\nou: services\n",
            f"dn: {self.people_dn}\nobjectClass: organizationalUnit\nou: people\n",
            f"dn: {self.bind_dn}\nobjectClass: person\ncn: {SERVICE_CN}\nsn: service\n"
            f"userPassword: {_ssha(self.bind_password)}\n",
        ]
        for uid, mail in people:
            out.append(f"dn: uid={uid},{self.people_dn}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\n"
                       f"sn: {uid}\nmail: {mail}\n")  # fmt: skip
        for uid in no_mail:  # a person without a mailbox: not an account
            out.append(f"dn: uid={uid},{self.people_dn}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\n"
                       f"sn: {uid}\n")  # fmt: skip
        return "\n".join(out)

    def start(self, people: list[tuple[str, str]], *, no_mail: tuple[str, ...] = ()) -> None:
        """Load the entries and start slapd."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "db").mkdir(mode=0o700, exist_ok=True)
        ca = tlsgen.ensure_ca(self.dir / "tls")
        tlsgen.issue_cert(ca, TLS_NAME)
        self.ca_file = ca.cert_file
        conf = self.dir / "slapd.conf"
        conf.write_text(self._conf())
        os.chmod(conf, 0o600)
        ldif = self.dir / "data.ldif"
        ldif.write_text(self._ldif(people, no_mail=no_mail))
        proc.run(["slapadd", "-f", str(conf), "-l", str(ldif)], what="slapadd")
        self.people = list(people)
        self.port, self.tls_port = proc.free_ports(self.host, 2)
        self.pid = proc.spawn(["slapd", "-d", "0", "-f", str(conf), "-h", f"{self.url}/ {self.ldaps_url}/"], self.log)
        for port in (self.port, self.tls_port):
            proc.wait_service(self.host, port, self.pid, what="slapd", log=self.log)

    def stop(self) -> None:
        if self.pid:
            proc.stop_group(self.pid)
            self.pid = 0

    def __enter__(self) -> Slapd:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
