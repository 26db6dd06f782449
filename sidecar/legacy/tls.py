"""TLS toward the legacy server: one context builder for the verifier, the IMAP source, ManageSieve and doctor."""

from __future__ import annotations

import socket
import ssl

from sidecar.config import LegacyConfig


class _NamedTLSContext(ssl.SSLContext):
    """An SSLContext that checks the certificate for one configured name, whatever host was dialled.

    imaplib, poplib and smtplib pass the host they connected to as server_hostname; the legacy server's new
    address usually is not the name in its certificate (legacy.tls_server_name).
    """

    expected_name: str = ""

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=self.expected_name or server_hostname,
            session=session,
        )


def tls_context(cfg: LegacyConfig) -> ssl.SSLContext:
    ctx = _NamedTLSContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.expected_name = cfg.tls_server_name or cfg.host
    if cfg.tls_verify:
        if cfg.ca_file:
            ctx.load_verify_locations(cafile=cfg.ca_file)
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
