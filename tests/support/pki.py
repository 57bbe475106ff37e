"""A throw-away certificate authority for tests of TLS client certificates (openssl CLI).

`TestCA(folder)` makes a CA; `server()` and `client(name)` issue leaf
certificates signed by it, each returned as (certfile, keyfile) PEM paths;
`client_dated(name, not_before, not_after)` one whose validity lies elsewhere
in time (expired, not yet valid).
Two CAs made this way do not trust each other, so a second one stands for a
certificate from the wrong authority.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

__all__ = ["TestCA", "client_certs"]

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


class TestCA:
    __test__ = False  # a helper, not a pytest test class

    def __init__(self, folder: Path, name: str = "smtpgate test CA"):
        if shutil.which("openssl") is None:
            raise RuntimeError("TestCA needs the openssl command")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cert = self.folder / "ca.pem"
        self.key = self.folder / "ca.key"
        _run("req", "-x509", *_EC, "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", str(self.key), "-out", str(self.cert))

    def server(self, name: str = "localhost") -> tuple[str, str]:
        """A server certificate for name, 127.0.0.1 and ::1."""
        return self._issue(name, f"subjectAltName=DNS:{name},IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\n")

    def client(self, name: str) -> tuple[str, str]:
        """A client certificate whose subject CN and DNS SAN are name."""
        return self._issue(name, f"subjectAltName=DNS:{name}\nextendedKeyUsage=clientAuth\n")

    def client_dated(self, name: str, not_before: datetime, not_after: datetime) -> tuple[str, str]:
        """A client certificate for name valid from not_before to not_after (cryptography;
        `openssl x509 -req` cannot date a certificate in the past)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        ca_key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(secrets.randbits(62) + 1)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        stem = f"{name.replace('*', '_')}-from-{not_before:%Y%m%d%H%M%S}"
        certfile, keyfile = self.folder / f"{stem}.pem", self.folder / f"{stem}.key"
        certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        keyfile.chmod(0o600)
        return str(certfile), str(keyfile)

    def _issue(self, name: str, extensions: str) -> tuple[str, str]:
        stem = self.folder / name.replace("*", "_")
        key, csr, cert, ext = (stem.with_suffix(s) for s in (".key", ".csr", ".pem", ".ext"))
        ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n" + extensions)
        _run("req", "-new", *_EC, "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
        _run("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
             "-set_serial", str(secrets.randbits(62) + 1),
             "-days", "2", "-extfile", str(ext), "-out", str(cert))
        key.chmod(0o600)
        return str(cert), str(key)


def _run(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def client_certs(tmp_path_factory) -> dict[str, str]:
    """Client certificate files: cert and its key, other_key (another certificate's), encrypted_key
    (key under a passphrase)."""
    folder = tmp_path_factory.mktemp("certs")
    ca = TestCA(folder / "ca")
    good, other = ca.client("relay.corp.example"), ca.client("other.example")
    encrypted = folder / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", good[1], "-aes256", "-passout", "pass:x", "-out", str(encrypted)],
                   check=True, capture_output=True)
    return {"cert": good[0], "key": good[1], "other_key": other[1], "encrypted_key": str(encrypted)}
