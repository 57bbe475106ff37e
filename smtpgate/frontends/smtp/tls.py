"""The listeners' TLS: Mozilla's "intermediate" server profile (version 5.7) by default.

Python's default server context also accepts the TLS 1.2 CBC suites
(ECDHE-*-AES*-SHA256/384) and every curve OpenSSL knows (X448, secp521r1);
the intermediate profile allows neither. `server_context` builds a context
with TLS 1.2 as the floor, the profile's TLS 1.2 cipher list (or the
listener's `tls_ciphers`), the profile's TLS 1.3 suites (OpenSSL's defaults
are exactly those three) and the groups X25519, prime256v1 and secp384r1.
SECURITY.md says what an operator may change and why.
"""

from __future__ import annotations

import ctypes
import ssl
from pathlib import Path

__all__ = ["INTERMEDIATE_CIPHERS", "INTERMEDIATE_GROUPS", "TlsSetupError", "server_context"]

# Mozilla Server Side TLS 5.7, "intermediate": TLS 1.2 suites in the profile's order. The
# DHE suites are used only where DH parameters are loaded, which smtpgate does not do.
INTERMEDIATE_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
])
INTERMEDIATE_GROUPS = ("X25519", "prime256v1", "secp384r1")

# OpenSSL's SSL_CTRL_SET_GROUPS_LIST (ssl.h), behind the SSL_CTX_set1_groups_list macro.
_SSL_CTRL_SET_GROUPS_LIST = 92


class TlsSetupError(Exception):
    """A listener's TLS settings cannot be applied (bad cipher string, unreadable pair)."""


def server_context(cert: Path | str, key: Path | str, ciphers: str = "",
                   client_ca: Path | str | None = None) -> ssl.SSLContext:
    """A server context for one listener: the intermediate profile unless `ciphers` overrides
    the TLS 1.2 suites; raises TlsSetupError naming what is wrong.

    With `client_ca` (the listener's tls_client_ca) the handshake asks every client for a
    certificate without requiring one; a certificate that does not verify against those CAs
    (another CA, expired, not yet valid) ends the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No compression (CRIME), a fresh ECDH key per handshake, no tickets (their keys never rotate
    # in a long-running process); the client's order among the profile's suites is fine (5.7).
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_SINGLE_ECDH_USE | ssl.OP_NO_TICKET
    try:
        context.set_ciphers(ciphers or INTERMEDIATE_CIPHERS)
    except ssl.SSLError:
        raise TlsSetupError(f"tls_ciphers: OpenSSL selects no cipher suite from {ciphers!r}") from None
    _set_groups(context, INTERMEDIATE_GROUPS)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"tls_cert/tls_key {cert}: {exc}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError(f"tls_client_ca {client_ca}: {exc}") from None
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _set_groups(context: ssl.SSLContext, groups: tuple[str, ...]) -> None:
    """Limit the key exchange groups; at worst to prime256v1 alone (still within the profile)."""
    setter = getattr(context, "set_groups", None)  # Python 3.15+
    if setter is not None:
        setter(":".join(groups))
        return
    # Python before 3.15 can set one curve only; that one is the floor every client supports.
    context.set_ecdh_curve("prime256v1")
    _set_groups_list(context, ":".join(groups))


def _set_groups_list(context: ssl.SSLContext, groups: str) -> bool:
    """SSL_CTX_set1_groups_list on the context's SSL_CTX; False when it could not be done.

    CPython's ssl object starts with its SSL_CTX pointer right after the object header
    (Modules/_ssl.c, PySSLContext, unchanged since 3.6); the call goes to the libssl the
    _ssl module itself is linked against, so both see the same SSL_CTX.
    """
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        ctrl = lib.SSL_CTX_ctrl
        get_options = lib.SSL_CTX_get_options
    except (OSError, AttributeError, ImportError):
        return False
    ctrl.restype, ctrl.argtypes = ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    get_options.restype, get_options.argtypes = ctypes.c_uint64, [ctypes.c_void_p]
    header = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)  # ob_refcnt, ob_type
    pointer = ctypes.c_void_p.from_address(id(context) + header).value
    # The same options seen from both sides: the pointer is this context's SSL_CTX.
    if not pointer or get_options(pointer) != context.options:
        return False
    return ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode("ascii")) == 1
