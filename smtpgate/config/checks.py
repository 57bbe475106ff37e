"""What a schema cannot say: files that must be readable, PEM certificates and keys,
relay networks that would make an open relay, OpenSSL cipher strings.

Each check returns the problem in words (None when there is none) or raises
ValueError with them; the schema's converters and rules call these.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from pathlib import Path

from smtpgate.users import Users, UsersError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)
_PEM_PRIVATE_KEY = re.compile(r"-----BEGIN ((?:[A-Z]+ )?PRIVATE KEY)-----")

# Ranges no one outside the organisation can send from: RFC 1918, loopback,
# link-local, RFC 6598 shared space, and their IPv6 counterparts (RFC 4193 ULA).
_PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16",
              "100.64.0.0/10", "::1/128", "fc00::/7", "fe80::/10")
)


# Names of the certificates Microsoft's clouds present on outbound connectors: shared by every
# tenant, so only required_headers tells this organisation's mail from another's.
_MICROSOFT_CERT_DOMAINS = ("outlook.com", "outlook.cn", "office365.us", "outlook.de")

# The stamp field is removed when it does not verify: never one of the fields the decision reads.
FIELDS_SMTPGATE_READS = frozenset({
    "to", "cc", "bcc", "from", "reply-to", "sender", "subject", "message-id", "in-reply-to", "references",
    "received", "date", "auto-submitted", "precedence", "dkim-signature", "x-ms-exchange-crosstenant-id",
})


def is_microsoft_cert_name(name: str) -> bool:
    """name (a relay_client_cert_names entry) is one of Microsoft 365's shared certificates."""
    bare = name.removeprefix("*.")
    return any(bare == d or bare.endswith("." + d) for d in _MICROSOFT_CERT_DOMAINS)


def readable(path: Path) -> Path:
    """path, when it can be opened for reading; else ValueError naming it and why."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return path


def writable_dir(path: Path) -> Path:
    """path, when it is a folder smtpgate may create files in; else ValueError naming it and why."""
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {path}")
    return path


def holds_text(path: Path) -> bool:
    """True when path holds more than white space (a token file)."""
    return bool(path.read_bytes().strip())


def users_file(path: Path) -> Path:
    """path, when every line of it is a user entry (or it does not exist yet)."""
    try:
        Users.load(path)
    except UsersError as exc:
        raise ValueError(str(exc)) from None
    return path


def cipher_string(value: str) -> str:
    """An OpenSSL TLS 1.2 cipher string that selects at least one suite ("" keeps the default)."""
    if value:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(value)
        except ssl.SSLError:
            raise ValueError(f"OpenSSL selects no cipher suite from {value!r}") from None
    return value


def pem_certificate_problem(path: Path) -> str | None:
    """Why path is not a PEM certificate (chain), or None when it is one."""
    text = path.read_text(encoding="ascii", errors="replace")
    blocks = _PEM_CERTIFICATE.findall(text)
    if not blocks:
        return f"{path} is not a PEM certificate (no -----BEGIN CERTIFICATE----- block)"
    try:
        ssl.create_default_context().load_verify_locations(cadata="\n".join(blocks))
    except ssl.SSLError:
        return f"{path}: a certificate in it is damaged and does not parse"
    return None


def pem_key_problem(path: Path, cert: Path) -> str | None:
    """Why path is not the unencrypted PEM private key of cert, or None."""
    text = path.read_text(encoding="ascii", errors="replace")
    found = _PEM_PRIVATE_KEY.search(text)
    if found is None:
        return f"{path} is not a PEM private key (no -----BEGIN PRIVATE KEY----- block)"
    if found.group(1) == "ENCRYPTED PRIVATE KEY" or "Proc-Type: 4,ENCRYPTED" in text:
        return f"{path} is encrypted with a passphrase; smtpgate needs the key unencrypted"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(path), password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return f"{path} does not match the certificate in {cert}"
        return f"{path}: the private key is damaged and does not parse"
    return None


def refuse_passphrase() -> bytes:
    """The password callback for a client key: OpenSSL would otherwise prompt on the
    terminal, which hangs a service."""
    raise ValueError("the private key is encrypted; smtpgate needs an unencrypted key file (root:smtpgate 0640)")


def client_certificate_problem(cert: Path, key: Path) -> tuple[str, str] | None:
    """(the key that is wrong, why) when cert and key cannot be used as a TLS client
    certificate, else None; loaded the way the upstream client loads them."""
    try:
        ssl.create_default_context().load_cert_chain(str(cert), str(key), password=refuse_passphrase)
    except ssl.SSLError as exc:
        why = {"KEY_VALUES_MISMATCH": "the key does not belong to the certificate"}.get(
            exc.reason or "", "not a PEM certificate and PEM private key")
        return "tls_client_cert", f"cannot use {cert} with {key}: {why}"
    except ValueError as exc:
        return "tls_client_key", f"cannot use {key}: {exc}"
    return None


def is_private(network: Network) -> bool:
    """True when every address of network lies in a range no outsider can send from."""
    return any(network.version == p.version and network.subnet_of(p) for p in _PRIVATE_NETWORKS)


def holds_address(networks: tuple[Network, ...], ip: str) -> bool:
    """True when ip (a client's address as the socket gives it; an IPv4-mapped IPv6 address as its IPv4
    address, a zone index ignored) lies in one of networks."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)


def public_network_problem(network: Network) -> str:
    return (f"{network} is not a private network: every host in it could relay through smtpgate "
            f"without AUTH (set allow_public_relay_networks: true on this listener if that is intended)")


def is_loopback_host(host: str | None) -> bool:
    """localhost, or a loopback address."""
    if host is None or host == "localhost":
        return host is not None
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def empty_secret_problem(path: Path | None) -> str | None:
    """Why a secret file cannot serve (it holds nothing), or None."""
    if path is None or holds_text(path):
        return None
    return f"{path} is empty: write the secret in it (one line)"


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def read_secret(path: Path | None) -> str | None:
    """The secret in path, white space around it dropped; None without a file. Read at each call,
    so a rotated secret needs no reload."""
    return None if path is None else path.read_text(encoding="utf-8").strip()


def hostname(value: str) -> str:
    """A host name for the greeting, EHLO and Received: (RFC 1123), or an address literal."""
    if value.startswith("[") and value.endswith("]") or _HOSTNAME.fullmatch(value):
        return value
    raise ValueError(f'"{value}" is not a host name (letters, digits, hyphens and dots, no spaces): it '
                     f"goes into the greeting, EHLO and Received:; write one such as relay.corp.example")


def template_problem(template: str, first_number: int, matches) -> str | None:
    """Why references a new_reference template makes would not be recognised as references."""
    made = template.format(n=first_number)
    if matches(made):
        return None
    return (f'"{template}" makes references such as {made}, which references.pattern does not match: '
            f"smtpgate would tag addresses its own replies cannot recognise; change the template or the pattern")


def same_address_problem(first: str, second: str, first_name: str,
                         a: tuple[str, int] | None, b: tuple[str, int] | None) -> str | None:
    """Why two listeners cannot both listen where they say (None when they can); a and b
    are their (host, port), None for a unix socket path."""
    if a is None or b is None:
        return f"{second} is also listener {first_name}'s socket: give each its own" if first == second else None
    if a[1] != b[1] or a[1] == 0:
        return None
    if a[0] != b[0]:
        try:
            ip_a, ip_b = ipaddress.ip_address(a[0]), ipaddress.ip_address(b[0])
        except ValueError:
            return None  # a host name: only the same name is known to collide
        # A wildcard takes the port on every address of its family (IPv6 listeners are v6-only).
        if ip_a.version != ip_b.version or not (ip_a.is_unspecified or ip_b.is_unspecified):
            return None
    return (f"{second} overlaps listener {first_name}'s {first}: serve could not listen on both "
            f"(address already in use); give each listener its own port")


_URL_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#@:]*:[^/?#@]+@")


def url_has_password(url: str) -> bool:
    """True when url's user info holds a password (`postgresql://user:pw@host/db`)."""
    return bool(_URL_PASSWORD.match(url))
