"""A connector peer's verified client certificate: its names, subject and issuer.

A listener with `tls_client_ca` asks for a client certificate; OpenSSL has
verified it (chain, validity dates) before the handshake completes. A client
whose certificate carries a name in `relay_client_cert_names` may relay as a
`relay_networks` client may (docs/connectors.md).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["PeerCertificate", "name_matches", "peer_certificate"]

# RFC 4514 short names for the attributes certificates use; others keep OpenSSL's long name.
_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
          "localityName": "L", "stateOrProvinceName": "ST", "domainComponent": "DC", "serialNumber": "SERIALNUMBER"}


@dataclass(frozen=True)
class PeerCertificate:
    subject: str  # RFC 4514 string, e.g. "CN=mail.protection.outlook.com,O=Microsoft Corporation,..."
    issuer: str
    names: tuple[str, ...]  # the DNS subject alternative names, else the common name; lower case

    def admitted_by(self, patterns: Iterable[str]) -> bool:
        """True when one of its names matches one of ``patterns`` (relay_client_cert_names)."""
        return any(name_matches(p, n) for p in patterns for n in self.names)


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerCertificate | None:
    """The verified client certificate of a completed handshake, or None (none was sent)."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:  # None: no certificate; {}: not verified (a listener without tls_client_ca)
        return None
    dns = tuple(v.lower().rstrip(".") for k, v in cert.get("subjectAltName", ()) if k == "DNS")
    common = tuple(v.lower().rstrip(".") for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName")
    return PeerCertificate(subject=_rfc4514(cert.get("subject", ())), issuer=_rfc4514(cert.get("issuer", ())),
                           names=dns or common)


def name_matches(pattern: str, name: str) -> bool:
    """``pattern`` (lower case) names ``name``: equal, or "*.rest" and name is one label more than rest.

    A certificate's own wildcard name ("*.example.com") matches only the same pattern.
    """
    name = name.lower()
    if pattern == name:
        return True
    if not pattern.startswith("*."):
        return False
    label, _, rest = name.partition(".")
    return bool(label) and rest == pattern[2:]


def _rfc4514(rdns) -> str:
    """A distinguished name as RFC 4514 writes it: the most specific RDN first."""
    parts = []
    for rdn in reversed(rdns):
        parts.append("+".join(f"{_SHORT.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(parts)


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out
