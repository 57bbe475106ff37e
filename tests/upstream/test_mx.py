"""`upstream.url: mx:DOMAIN` against `smtpgate serve` as a process, a DNS server and sinks on loopback.

Each MX host is a sink on its own loopback address (127.0.0.2, .3, ...), all on
one port, named by the test's DNS server (tests/support/dns.py) that
`upstream.resolver` points at. An address with no sink refuses connections.
"""

from __future__ import annotations

import contextlib
import random
import ssl

from smtpgate.config import load_config
from smtpgate.upstream.mx import MxRoute, Target, order_exchanges
from tests.conftest import write_config
from tests.support.dns import DnsServer
from tests.support.process import ServeProcess
from tests.support.sink import Sink, make_test_tls
from tests.support.wire import Wire, code, free_port
from tests.frontends.smtp.test_relay import session

CONFIG = """\
hostname: relay.test.example
listeners:
  - name: submission
    address: 127.0.0.1:{port}
    relay_networks: [127.0.0.0/8]
upstream:
  url: mx:corp.example:{mx_port}
  resolver: {resolver}
  pool_size: 0
  timeout: 8
  timeouts: {{connect: 2, command: 5, data: 5}}
{extra}internal_domains: [corp.example]
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
"""


@contextlib.asynccontextmanager
async def mx_hosts(addresses: list[str], **sink_options):
    """Sinks on each loopback address, all on one port: yields (port, {address: sink})."""
    for _ in range(20):
        sinks: dict[str, Sink] = {}
        try:
            port = 0
            for address in addresses:
                sink = Sink(host=address, port=port, **sink_options)
                await sink.start()
                sinks[address] = sink
                port = sink.port
        except OSError:  # that port is taken on another address: try another
            for sink in sinks.values():
                await sink.stop()
            continue
        try:
            yield port or free_port(), sinks
        finally:
            for sink in sinks.values():
                await sink.stop()
        return
    raise RuntimeError("no port free on every address")


def config(tmp_path, port: int, mx_port: int, dns: DnsServer, extra: str = ""):
    return write_config(tmp_path, CONFIG.format(port=port, mx_port=mx_port, resolver=dns.address, extra=extra))


async def send_one(port: int, n: int = 0) -> tuple[str, str]:
    """One message; (stage, reply) of the first refusal, else ("dot", the reply to the dot)."""
    wire, greeting = await Wire.open(port)
    try:
        assert code(greeting) == 220
        await wire.cmd("EHLO client.test")
        reply = await wire.cmd("MAIL FROM:<jane@corp.example>")
        if code(reply) != 250:
            return "MAIL", reply
        reply = await wire.cmd("RCPT TO:<client@supplier.example>")
        if code(reply) != 250:
            return "RCPT", reply
        assert code(await wire.cmd("DATA")) == 354
        await wire.send(f"Subject: mx {n}\r\nMessage-ID: <mx-{n}@corp.example>\r\n\r\nbody\r\n.\r\n".encode())
        return "dot", await wire.reply()
    finally:
        await wire.close()


async def test_first_mx_refuses_second_accepts_and_the_failure_is_remembered(tmp_path):
    async with DnsServer() as dns, mx_hosts(["127.0.0.3"]) as (mx_port, sinks):
        dns.add("corp.example", "MX", "10 mx1.corp.example.", "20 mx2.corp.example.")
        dns.add("mx1.corp.example", "A", "127.0.0.2")  # nothing listens there: refused
        dns.add("mx2.corp.example", "A", "127.0.0.3")
        port = free_port()
        async with ServeProcess(config(tmp_path, port, mx_port, dns)) as served:
            for n in range(3):
                assert await send_one(port, n) == ("dot", "250 2.0.0 Ok: queued")
            assert len(sinks["127.0.0.3"].messages) == 3
            relayed = served.named("message.relayed")
            assert all("mx2.corp.example[127.0.0.3]" in e["upstream"] for e in relayed)
            # mx1 refused once (at start-up); for a while it is tried after mx2, which answers.
            refused = [e for e in served.named("upstream.error") if e.get("address") == "127.0.0.2"]
            assert len(refused) == 1 and "mx1.corp.example" == refused[0]["host"]


async def test_equal_preferences_are_both_used_and_a_worse_one_never(tmp_path):
    async with DnsServer() as dns, mx_hosts(["127.0.0.2", "127.0.0.3", "127.0.0.4"]) as (mx_port, sinks):
        dns.add("corp.example", "MX", "10 a.mx.corp.example.", "10 b.mx.corp.example.", "20 c.mx.corp.example.")
        dns.add("a.mx.corp.example", "A", "127.0.0.2")
        dns.add("b.mx.corp.example", "A", "127.0.0.3")
        dns.add("c.mx.corp.example", "A", "127.0.0.4")
        port = free_port()
        async with ServeProcess(config(tmp_path, port, mx_port, dns)):
            for n in range(20):  # pool_size 0: a new connection, so a new choice, each time
                assert await send_one(port, n) == ("dot", "250 2.0.0 Ok: queued")
        counts = {address: len(sink.messages) for address, sink in sinks.items()}
        # Both equal hosts get some of 20 (all on one: probability 2 * 2**-20).
        assert counts["127.0.0.2"] > 0 and counts["127.0.0.3"] > 0 and counts["127.0.0.4"] == 0, counts
        assert counts["127.0.0.2"] + counts["127.0.0.3"] == 20


async def test_what_dns_says_decides_the_reply_at_mail(tmp_path):
    """No MX: the A record; all MX down: 451 4.4.1; null MX: 556 5.1.10; no domain, SERVFAIL: 451."""
    async with DnsServer() as dns, mx_hosts(["127.0.0.2"]) as (mx_port, sinks):
        dns.add("corp.example", "A", "127.0.0.2")  # RFC 5321 5.1: the implicit MX
        port = free_port()
        async with ServeProcess(config(tmp_path, port, mx_port, dns)) as served:
            assert await send_one(port, 1) == ("dot", "250 2.0.0 Ok: queued")
            assert len(sinks["127.0.0.2"].messages) == 1

            dns.clear()
            dns.add("corp.example", "MX", "10 mx1.corp.example.", "20 mx2.corp.example.")
            dns.add("mx1.corp.example", "A", "127.0.0.5")
            dns.add("mx2.corp.example", "A", "127.0.0.6")
            stage, reply = await send_one(port, 2)
            assert (stage, reply[:9]) == ("MAIL", "451 4.4.1")

            dns.clear()
            dns.add("corp.example", "MX", "0 .")
            stage, reply = await send_one(port, 3)
            assert (stage, reply[:10]) == ("MAIL", "556 5.1.10")

            dns.clear()
            dns.add("other.example", "A", "127.0.0.2")  # corp.example itself: NXDOMAIN
            stage, reply = await send_one(port, 4)
            assert (stage, reply[:9]) == ("MAIL", "451 4.4.4")

            dns.servfail.add("corp.example")
            stage, reply = await send_one(port, 5)
            assert (stage, reply[:9]) == ("MAIL", "451 4.4.3")

            dns.clear()
            dns.add("corp.example", "MX", "10 mx.corp.example.")
            dns.add("mx.corp.example", "A", "127.0.0.2")
            assert await send_one(port, 6) == ("dot", "250 2.0.0 Ok: queued")
            assert len(sinks["127.0.0.2"].messages) == 2
            assert served.named("session.error") == []


async def test_opportunistic_starttls_to_an_mx_that_offers_it(tmp_path):
    context, _ = make_test_tls(tmp_path / "mx")
    async with DnsServer() as dns, mx_hosts(["127.0.0.2", "127.0.0.3"]) as (mx_port, plain_sinks):
        # 127.0.0.2 offers STARTTLS with a certificate no CA vouches for; 127.0.0.3 offers none.
        tls_sink = plain_sinks["127.0.0.2"]
        tls_sink.starttls_context = context
        dns.add("corp.example", "MX", "10 mx1.corp.example.")
        dns.add("mx1.corp.example", "A", "127.0.0.2")
        port = free_port()
        async with ServeProcess(config(tmp_path, port, mx_port, dns)):
            assert await send_one(port, 1) == ("dot", "250 2.0.0 Ok: queued")
            dns.clear()
            dns.add("corp.example", "MX", "10 mx2.corp.example.")
            dns.add("mx2.corp.example", "A", "127.0.0.3")
            assert await send_one(port, 2) == ("dot", "250 2.0.0 Ok: queued")
        [encrypted] = tls_sink.messages
        [clear] = plain_sinks["127.0.0.3"].messages
        assert encrypted.tls and not clear.tls


async def test_tls_required_skips_an_mx_without_starttls_and_checks_the_certificate(tmp_path):
    context, cafile = make_test_tls(tmp_path / "mx")
    async with DnsServer() as dns, mx_hosts(["127.0.0.2", "127.0.0.3"]) as (mx_port, sinks):
        sinks["127.0.0.3"].starttls_context = context
        # The certificate names localhost: the MX host that has it must be called that.
        dns.add("corp.example", "MX", "10 plain.corp.example.", "20 localhost.")
        dns.add("plain.corp.example", "A", "127.0.0.2")
        dns.add("localhost", "A", "127.0.0.3")
        port = free_port()
        extra = f"  tls: required\n  ca_file: {cafile}\n"
        async with ServeProcess(config(tmp_path, port, mx_port, dns, extra)) as served:
            assert await send_one(port, 1) == ("dot", "250 2.0.0 Ok: queued")
            [msg] = sinks["127.0.0.3"].messages
            assert msg.tls and sinks["127.0.0.2"].messages == []

            # A host whose certificate does not match its name is refused too: all down, 451.
            dns.clear()
            dns.add("corp.example", "MX", "10 wrong-name.corp.example.")
            dns.add("wrong-name.corp.example", "A", "127.0.0.3")
            stage, reply = await send_one(port, 2)
            assert (stage, reply[:9]) == ("MAIL", "451 4.4.1")
            failures = [e["reason"] for e in served.named("upstream.error") if e.get("host") == "wrong-name.corp.example"]
            assert failures and "CERTIFICATE_VERIFY_FAILED" in failures[0]


def test_order_is_by_preference_with_equal_ones_shuffled():
    records = [(20, "c"), (10, "b"), (10, "a"), (30, "d"), (10, "A")]
    orders = {tuple((p, host.lower()) for p, host in order_exchanges(records, random.Random(seed)))
              for seed in range(40)}
    assert {o[:2] for o in orders} == {((10, "a"), (10, "b")), ((10, "b"), (10, "a"))}
    assert all(o[2:] == ((20, "c"), (30, "d")) for o in orders)  # "A" is "a" again: listed once


def test_a_failed_address_is_tried_after_the_others_not_dropped():
    route = MxRoute("corp.example", port=25, resolver="127.0.0.1:53", lifetime=1)
    a, b, c = (Target("mx1", "127.0.0.2", 10), Target("mx2", "127.0.0.3", 10), Target("mx3", "127.0.0.4", 20))
    route.failed(b)
    route.failed(a)
    assert route._healthy_first([a, b, c]) == [c, b, a]  # b recovers first: it was marked first
    route.succeeded(b)
    assert route._healthy_first([a, b, c]) == [b, c, a]


def _no_shared_cipher() -> ssl.SSLContext:
    """A server context offering only anonymous TLS 1.2 ciphers, which no default client accepts."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("aNULL:@SECLEVEL=0")
    return context


async def test_a_failed_opportunistic_handshake_goes_on_in_clear_and_required_refuses(
        tmp_path, start_gate, log_lines):
    async with DnsServer() as dns, mx_hosts(["127.0.0.2"], starttls_context=_no_shared_cipher()) as (mx_port, _):
        dns.add("corp.example", "MX", "10 mx1.corp.example.")
        dns.add("mx1.corp.example", "A", "127.0.0.2")
        for tls, expected in (("opportunistic", "250"), ("required", "451 4.4.1")):
            folder = tmp_path / tls
            folder.mkdir()
            text = CONFIG.format(port=0, mx_port=mx_port, resolver=dns.address, extra=f"  tls: {tls}\n")
            gate, port = await start_gate(load_config(write_config(folder, text)))
            wire = await session(port)
            assert (await wire.cmd("MAIL FROM:<jane@corp.example>")).startswith(expected)
            await wire.cmd("QUIT")
        events = log_lines()
        # pool_size 0: the start-up probe and the MAIL each connect. Opportunistic: both handshakes
        # failed and both went on in clear; required: both were refused, and MAIL got 451.
        failed_tls = [e for e in events if e["event"] == "upstream.tls_failed"]
        refused = [e for e in events if e["event"] == "upstream.error" and e.get("host") == "mx1.corp.example"]
        assert [e["host"] for e in failed_tls] == ["mx1.corp.example"] * 2
        assert [(e["stage"], e["address"]) for e in refused] == [("mx_host", "127.0.0.2")] * 2
        assert events.index(failed_tls[-1]) < events.index(refused[0])
