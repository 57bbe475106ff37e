"""A client certificate as a listener reads it after a real TLS handshake on loopback
(smtpgate/frontends/smtp/peercert.py): its DNS names, and subject and issuer as RFC 4514
strings with every special character escaped."""

from __future__ import annotations

import asyncio
import ssl
from datetime import datetime, timedelta, timezone
from ipaddress import ip_address

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smtpgate.frontends.smtp.peercert import PeerCertificate, peer_certificate
from smtpgate.frontends.smtp.tls import server_context

A = x509.NameAttribute


def _pem(folder, stem, cert, key) -> tuple[str, str]:
    certfile, keyfile = folder / f"{stem}.pem", folder / f"{stem}.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(certfile), str(keyfile)


class _CA:
    def __init__(self, folder, subject: x509.Name):
        self.folder, self.subject = folder, subject
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self._sign(subject, self.key.public_key(), ca=True, extensions=[])
        self.file = _pem(folder, "ca", self.cert, self.key)[0]

    def _sign(self, subject, public_key, *, ca: bool, extensions) -> x509.Certificate:
        now = datetime.now(timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.subject)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue(self, stem: str, subject: x509.Name, names=(), client: bool = True) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        extensions = [x509.ExtendedKeyUsage([usage])]
        if names:
            extensions.append(x509.SubjectAlternativeName(list(names)))
        return _pem(self.folder, stem, self._sign(subject, key.public_key(), ca=False, extensions=extensions), key)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peercert")
    authority = _CA(folder, x509.Name([A(NameOID.COUNTRY_NAME, "PL"), A(NameOID.ORGANIZATION_NAME, "Corp, Test"),
                                       A(NameOID.COMMON_NAME, "Peer CA")]))
    authority.server = authority.issue("server", x509.Name([A(NameOID.COMMON_NAME, "localhost")]),
                                       [x509.DNSName("localhost"), x509.IPAddress(ip_address("127.0.0.1"))],
                                       client=False)
    return authority


async def handshake(ca: _CA, client_pair: tuple[str, str] | None, client_ca: bool = True) -> PeerCertificate | None:
    """peer_certificate of the server side of one loopback handshake."""
    server = server_context(*ca.server, client_ca=ca.file if client_ca else None)
    seen: asyncio.Future = asyncio.get_running_loop().create_future()

    async def serve(reader, writer):
        try:
            seen.set_result(peer_certificate(writer.get_extra_info("ssl_object")))
        except Exception as exc:  # the test fails with it rather than wait for ever
            seen.set_exception(exc)
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server)
    port = listener.sockets[0].getsockname()[1]
    client = ssl.create_default_context(cafile=ca.file)
    if client_pair is not None:
        client.load_cert_chain(*client_pair)
    async with listener:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
        result = await seen
        writer.close()
    return result


async def test_dns_names_are_lower_case_without_the_final_dot_and_other_names_are_skipped(ca):
    pair = ca.issue("dns", x509.Name([A(NameOID.COMMON_NAME, "cn.peer.test")]),
                    [x509.RFC822Name("postmaster@peer.test"), x509.DNSName("Mail.Peer.Test."),
                     x509.IPAddress(ip_address("192.0.2.1")), x509.DNSName("backup.peer.test")])
    cert = await handshake(ca, pair)
    assert cert.names == ("mail.peer.test", "backup.peer.test")
    assert cert.subject == "CN=cn.peer.test"
    assert cert.issuer == "CN=Peer CA,O=Corp\\, Test,C=PL"
    assert cert.admitted_by(["*.peer.test"]) and not cert.admitted_by(["cn.peer.test"])


async def test_without_dns_names_the_common_name_counts(ca):
    pair = ca.issue("cn", x509.Name([A(NameOID.ORGANIZATION_NAME, "Peer"), A(NameOID.COMMON_NAME, "Relay.Peer.Test.")]),
                    [x509.RFC822Name("postmaster@peer.test")])
    cert = await handshake(ca, pair)
    assert cert.names == ("relay.peer.test",)
    assert cert.subject == "CN=Relay.Peer.Test.,O=Peer"


async def test_every_short_attribute_name_a_multi_valued_rdn_and_a_long_name(ca):
    subject = x509.Name([
        x509.RelativeDistinguishedName([A(NameOID.DOMAIN_COMPONENT, "test")]),
        x509.RelativeDistinguishedName([A(NameOID.COUNTRY_NAME, "PL")]),
        x509.RelativeDistinguishedName([A(NameOID.STATE_OR_PROVINCE_NAME, "Mazowieckie")]),
        x509.RelativeDistinguishedName([A(NameOID.LOCALITY_NAME, "Warsaw")]),
        x509.RelativeDistinguishedName([A(NameOID.ORGANIZATION_NAME, "Corp")]),
        x509.RelativeDistinguishedName([A(NameOID.ORGANIZATIONAL_UNIT_NAME, "Mail"),
                                        A(NameOID.SERIAL_NUMBER, "42")]),
        x509.RelativeDistinguishedName([A(NameOID.EMAIL_ADDRESS, "ops@peer.test")]),
        x509.RelativeDistinguishedName([A(NameOID.COMMON_NAME, "relay.peer.test")]),
    ])
    cert = await handshake(ca, ca.issue("all", subject))
    # OpenSSL keeps an RDN's values in DER order (a set), here serialNumber before OU.
    assert cert.subject == ("CN=relay.peer.test,emailAddress=ops@peer.test,SERIALNUMBER=42+OU=Mail,O=Corp,"
                            "L=Warsaw,ST=Mazowieckie,C=PL,DC=test")


@pytest.mark.parametrize("stem, value, written", [
    ("special", 'a,b+c"d\\e<f>g;h=i', 'a\\,b\\+c\\"d\\\\e\\<f\\>g\\;h\\=i'),
    ("lead", " lead", "\\ lead"),
    ("hash", "#hash", "\\#hash"),
    ("trail", "trail ", "trail\\ "),
    ("space", " ", "\\ "),  # one space: escaped once, as the leading one
    ("inside", "In Side X", "In Side X"),
])
async def test_rfc4514_escapes(ca, stem, value, written):
    cert = await handshake(ca, ca.issue(stem, x509.Name([A(NameOID.ORGANIZATION_NAME, value),
                                                         A(NameOID.COMMON_NAME, "x.peer.test")])))
    assert cert.subject == f"CN=x.peer.test,O={written}"


async def test_no_certificate_or_an_unverified_one_is_none(ca):
    assert await handshake(ca, None) is None
    pair = ca.issue("unverified", x509.Name([A(NameOID.COMMON_NAME, "x.peer.test")]), [x509.DNSName("x.peer.test")])
    assert await handshake(ca, pair, client_ca=False) is None
    assert peer_certificate(None) is None
