"""The account list from a directory (OpenLDAP, Active Directory) for `autoport inventory --from ldap`.

ldap3 (the `ldap` extra) is imported here only. One bind (simple bind with [ldap] bind_dn/bind_password, or
anonymous when bind_dn is empty), after StartTLS on an ldap:// URL unless [ldap] starttls = false, then a paged
subtree search of base_dn for `filter`, reading only the mail attribute. The bind password goes to the server and
nowhere else: errors carry ldap3's result description, never the password or the bind request.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Iterator
from typing import Any

from sidecar.config import Config
from sidecar.ops.actions import OpsError


def _tls(cfg: Config) -> Any:
    from ldap3 import Tls

    name = cfg.ldap.tls_server_name
    return Tls(
        validate=ssl.CERT_REQUIRED if cfg.ldap.tls_verify else ssl.CERT_NONE,
        ca_certs_file=cfg.ldap.ca_file or None,
        version=ssl.PROTOCOL_TLS_CLIENT,
        valid_names=[name] if name else None,  # checked besides the URL's host (ldap3 tries both)
        sni=name or None,
    )


def search(cfg: Config) -> Iterator[tuple[str, str]]:
    """(address, dn) of every matching entry with a mail attribute (each value of a multi-valued one)."""
    lc = cfg.ldap
    if not lc.url:
        raise OpsError(f"no directory in {cfg.path or 'the configuration'}: set [ldap] url, base_dn (and bind_dn, "
                       "bind_password) to list accounts from LDAP or Active Directory")  # fmt: skip
    if not lc.base_dn:
        raise OpsError(f"[ldap] base_dn is empty in {cfg.path or 'the configuration'}")
    try:
        import ldap3
        from ldap3.core.exceptions import LDAPException
    except ImportError:
        raise OpsError("LDAP needs the ldap3 package: pip install 'autoport[ldap]'") from None
    timeout = max(1, math.ceil(lc.timeout))  # ldap3 packs socket timeouts as integers
    uses_tls = lc.url.startswith("ldaps://") or lc.starttls
    server = ldap3.Server(lc.url, connect_timeout=timeout, tls=_tls(cfg) if uses_tls else None,
                          get_info=ldap3.NONE)  # fmt: skip
    conn = ldap3.Connection(
        server,
        user=lc.bind_dn or None,
        password=lc.bind_password or None,
        authentication=ldap3.SIMPLE if lc.bind_dn else ldap3.ANONYMOUS,
        receive_timeout=timeout,
        raise_exceptions=False,
        read_only=True,
    )
    try:
        try:
            if not conn.open(read_server_info=False) and conn.closed:
                raise OpsError(f"cannot connect to {lc.url}: {conn.last_error or 'connection failed'}")
            if lc.url.startswith("ldap://") and lc.starttls and not conn.start_tls(read_server_info=False):
                raise OpsError(f"StartTLS with {lc.url} failed: {conn.result.get('description', conn.last_error)}")
            if not conn.bind(read_server_info=False):
                who = lc.bind_dn or "anonymous"
                raise OpsError(
                    f"LDAP bind as {who} on {lc.url} refused: {conn.result.get('description', 'error')} "
                    "(check [ldap] bind_dn and bind_password)"
                )
            entries = conn.extend.standard.paged_search(
                lc.base_dn, lc.filter, search_scope=ldap3.SUBTREE, attributes=[lc.mail_attribute],
                paged_size=lc.page_size, generator=True,
            )  # fmt: skip
            for entry in entries:
                if entry.get("type") != "searchResEntry":
                    continue
                values = entry.get("attributes", {}).get(lc.mail_attribute) or []
                if isinstance(values, str):
                    values = [values]
                for v in values:
                    yield str(v).strip(), str(entry.get("dn", ""))
            result = conn.result or {}
            if result.get("result", 0) not in (0,):
                raise OpsError(f"LDAP search of {lc.base_dn} failed: {result.get('description', 'error')} "
                               f"{result.get('message', '')}".rstrip())  # fmt: skip
        except (LDAPException, OSError) as e:
            raise OpsError(f"LDAP {lc.url}: {type(e).__name__}: {e}") from None
    finally:
        conn.unbind()
