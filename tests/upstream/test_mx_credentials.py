"""`mx:` upstreams with smtpgate's own credentials, and their connections counted.

Every MX host connection logs in per `upstream.auth` and shows the TLS client
certificate; a host that refuses the login is skipped like one that is down,
and when every host refuses it the client hears 451 4.7.0. MX connections count
under `upstream.max_connections` and in the connections-in-use gauge. The MX
hosts are sinks on loopback addresses named by a test DNS server (as in
tests/upstream/test_mx.py); the certificates come from tests/support/pki.py.
"""

from __future__ import annotations

import ssl

from prometheus_client import REGISTRY

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.support.dns import DnsServer
from tests.upstream.test_mx import CONFIG, mx_hosts
from tests.frontends.smtp.test_relay import session
from tests.upstream.test_upstream_client_cert import pki, upstream_tls  # noqa: F401 - pki is a fixture

LOGIN = {"relay@corp.example": "upstream s3cret"}


def in_use() -> float:
    return REGISTRY.get_sample_value("smtpgate_upstream_connections_in_use") or 0.0


def gate_config(tmp_path, mx_port: int, dns: DnsServer, extra: str):
    text = CONFIG.format(port=0, mx_port=mx_port, resolver=dns.address, extra=extra)
    return load_config(write_config(tmp_path, text))


async def mail(port: int) -> str:
    wire = await session(port)
    try:
        return await wire.cmd("MAIL FROM:<jane@corp.example>")
    finally:
        await wire.cmd("QUIT")
        await wire.close()


async def test_each_mx_host_gets_the_login_and_the_client_certificate(tmp_path, pki, start_gate, log_lines):  # noqa: F811
    (tmp_path / "upstream.secret").write_text(LOGIN["relay@corp.example"] + "\n")
    cert, key = pki["relay"]
    extra = (f"  username: relay@corp.example\n  password_file: upstream.secret\n"
             f"  tls_client_cert: {cert}\n  tls_client_key: {key}\n")
    starttls = upstream_tls(pki, ssl.CERT_OPTIONAL)
    async with DnsServer() as dns, mx_hosts(["127.0.0.2", "127.0.0.3"], auth=dict(LOGIN), require_auth=True,
                                            client_cert_names={"relay.corp.example"},
                                            starttls_context=starttls) as (mx_port, sinks):
        dns.add("corp.example", "MX", "10 mx1.corp.example.", "20 mx2.corp.example.")
        dns.add("mx1.corp.example", "A", "127.0.0.2")
        dns.add("mx2.corp.example", "A", "127.0.0.3")
        first, second = sinks["127.0.0.2"], sinks["127.0.0.3"]
        first.auth = {"relay@corp.example": "another password"}  # mx1 refuses smtpgate's login
        gate, port = await start_gate(gate_config(tmp_path, mx_port, dns, extra))

        wire = await session(port)
        assert (await wire.cmd("MAIL FROM:<jane@corp.example>")).startswith("250")
        assert (await wire.cmd("RCPT TO:<client@supplier.example>")).startswith("250")
        assert (await wire.cmd("DATA")).startswith("354")
        await wire.send(b"Subject: mx login\r\nMessage-ID: <mx-login@corp.example>\r\n\r\nbody\r\n.\r\n")
        assert (await wire.reply()).startswith("250")
        await wire.cmd("QUIT")
        await wire.close()

        [msg] = second.messages
        assert msg.tls and msg.client_cert == "relay.corp.example"
        assert first.messages == [] and any(c.startswith("AUTH") for c in first.commands)
        skipped = [e for e in log_lines() if e["event"] == "upstream.error" and e.get("host") == "mx1.corp.example"]
        assert skipped and all(e["stage"] == "mx_host" and "refused" in e["reason"] for e in skipped)

        # Every host refuses the login: smtpgate's credentials, 451 4.7.0, not an unreachable upstream.
        second.auth = {"relay@corp.example": "another password"}
        assert (await mail(port)).startswith("451 4.7.0")
        [failed] = [e for e in log_lines() if e["event"] == "upstream.auth_failed" and e["stage"] == "connect"]
        assert "mx1.corp.example" in failed["reason"] and "mx2.corp.example" in failed["reason"]
        assert LOGIN["relay@corp.example"] not in str(log_lines())


async def test_mx_connections_count_in_max_connections_and_in_use(tmp_path, start_gate, log_lines):
    async with DnsServer() as dns, mx_hosts(["127.0.0.2"]) as (mx_port, sinks):
        dns.add("corp.example", "MX", "10 mx1.corp.example.")
        dns.add("mx1.corp.example", "A", "127.0.0.2")
        sink = sinks["127.0.0.2"]
        gate, port = await start_gate(gate_config(tmp_path, mx_port, dns, "  max_connections: 1\n"))
        await sink.wait_for(lambda: "QUIT" in sink.commands, what="the start-up probe's connection closed")
        before = in_use()

        holder = await session(port)
        assert (await holder.cmd("MAIL FROM:<jane@corp.example>")).startswith("250")
        assert in_use() == before + 1
        assert (await mail(port)).startswith("451 4.4.5")  # the one MX connection is taken

        sink.reset()
        await holder.cmd("QUIT")
        await holder.close()
        await sink.wait_for(lambda: "QUIT" in sink.commands, what="the held connection closed")
        assert in_use() == before
        assert (await mail(port)).startswith("250")
