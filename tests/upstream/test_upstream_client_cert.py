"""upstream.tls_client_cert / tls_client_key: smtpgate identifies itself to its upstream by certificate.

The upstream is a real SMTP sink over STARTTLS with its own test CA; the
certificates are made per test with the openssl command (tests/support/pki.py).
"""

from __future__ import annotations

import json
import ssl

import pytest

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.support.pki import TestCA
from tests.support.sink import Sink
from tests.support.smtp import send

BODY = b"Subject: certificate\r\nMessage-ID: <cert@corp.example>\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The upstream's CA with a server and two client certificates, and a stranger's CA."""
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger = TestCA(folder / "ca"), TestCA(folder / "stranger", "stranger CA")
    return {
        "ca": ca.cert,
        "server": ca.server("localhost"),
        "relay": ca.client("relay.corp.example"),
        "intruder": ca.client("intruder.example"),
        "stranger": stranger.client("relay.corp.example"),
    }


def upstream_tls(pki, verify: ssl.VerifyMode) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*pki["server"])
    context.load_verify_locations(cafile=str(pki["ca"]))
    context.verify_mode = verify
    return context


def gate_config(folder, pki, sink_port: int, client: str | None):
    folder.mkdir(parents=True, exist_ok=True)
    cert = (f"  tls_client_cert: {pki[client][0]}\n  tls_client_key: {pki[client][1]}\n" if client else "")
    return load_config(write_config(folder, f"""\
hostname: relay.test.example
listeners:
  - name: submission
    address: 127.0.0.1:0
    relay_networks: [127.0.0.1/32]
upstream:
  url: smtp+starttls://localhost:{sink_port}
  ca_file: {pki["ca"]}
  timeout: 10
{cert}internal_domains: [corp.example]
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
"""))


async def relay_one(port: int) -> tuple[int, str]:
    result = await send("127.0.0.1", port, mail_from="a@corp.example", rcpt_tos=["b@x.example"], data=BODY)
    return result.data if result.data else result.mail


async def test_upstream_that_requires_a_client_certificate(tmp_path, pki, start_gate, log_lines):
    async with Sink(starttls_context=upstream_tls(pki, ssl.CERT_REQUIRED)) as up:
        # Without a certificate the TLS handshake is refused: the upstream cannot be reached.
        _, port = await start_gate(gate_config(tmp_path / "none", pki, up.port, None))
        code, text = await relay_one(port)
        assert code == 451 and text.startswith("4.4.1 ")
        # A certificate from a CA the upstream does not trust fares no better.
        _, port = await start_gate(gate_config(tmp_path / "stranger", pki, up.port, "stranger"))
        code, text = await relay_one(port)
        assert code == 451 and text.startswith("4.4.1 ")
        assert up.messages == []
        # With its certificate, smtpgate gets through.
        _, port = await start_gate(gate_config(tmp_path / "relay", pki, up.port, "relay"))
        assert (await relay_one(port))[0] == 250
        [message] = up.messages
        assert message.tls and message.client_cert == "relay.corp.example"
    text = json.dumps(log_lines())
    assert "PRIVATE KEY" not in text and open(pki["relay"][1]).read().splitlines()[1] not in text


async def test_connector_that_attributes_by_certificate_name(tmp_path, pki, start_gate, log_lines):
    """Like an Exchange Online inbound connector: TLS without a certificate works, relaying does not."""
    names = {"relay.corp.example"}
    async with Sink(starttls_context=upstream_tls(pki, ssl.CERT_OPTIONAL), client_cert_names=names) as up:
        _, port = await start_gate(gate_config(tmp_path / "none", pki, up.port, None))
        assert await relay_one(port) == (550, "5.7.64 TenantAttribution; Relay Access Denied")
        _, port = await start_gate(gate_config(tmp_path / "intruder", pki, up.port, "intruder"))
        assert await relay_one(port) == (550, "5.7.64 TenantAttribution; Relay Access Denied")
        assert up.messages == []
        _, port = await start_gate(gate_config(tmp_path / "relay", pki, up.port, "relay"))
        assert (await relay_one(port))[0] == 250
        assert [m.client_cert for m in up.messages] == ["relay.corp.example"]


async def test_renewed_certificate_is_used_without_a_reload(tmp_path, pki, start_gate, log_lines):
    """The certificate files are read at each new upstream connection."""
    async with Sink(starttls_context=upstream_tls(pki, ssl.CERT_OPTIONAL), client_cert_names={"relay.corp.example"}) as up:
        folder = tmp_path / "renew"
        folder.mkdir()
        cert, key = folder / "client.pem", folder / "client.key"
        cert.write_bytes(open(pki["intruder"][0], "rb").read())
        key.write_bytes(open(pki["intruder"][1], "rb").read())
        config = load_config(write_config(folder, f"""\
listeners:
  - name: submission
    address: 127.0.0.1:0
    relay_networks: [127.0.0.1/32]
upstream:
  url: smtp+starttls://localhost:{up.port}
  ca_file: {pki["ca"]}
  pool_size: 0
  tls_client_cert: client.pem
  tls_client_key: client.key
internal_domains: [corp.example]
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
"""))
        _, port = await start_gate(config)
        assert (await relay_one(port))[0] == 550
        cert.write_bytes(open(pki["relay"][0], "rb").read())
        key.write_bytes(open(pki["relay"][1], "rb").read())
        assert (await relay_one(port))[0] == 250
