"""`mx:` routing against a DNS server on loopback: IPv6 hosts, look-up failures, the failed-host record.

MxRoute asks the test's DNS server (tests/support/dns.py) through dnspython's real
resolver; the last test relays through smtpgate to sinks on two loopback addresses.
"""

from __future__ import annotations

import random

import pytest

from smtpgate.config import load_config
from smtpgate.mail import replies
from smtpgate.upstream.mx import MxRoute, RouteError, Target
from tests.conftest import write_config
from tests.support.dns import DnsServer
from tests.support.sink import Sink
from tests.upstream.test_mx import CONFIG, mx_hosts, send_one


def route(dns: DnsServer, **kw) -> MxRoute:
    return MxRoute("corp.example", port=25, resolver=dns.address, lifetime=2, rng=random.Random(1), **kw)


async def test_ipv6_addresses_are_targets_after_the_ipv4_ones():
    async with DnsServer() as dns:
        dns.add("corp.example", "MX", "10 mx1.corp.example.", "20 mx2.corp.example.")
        dns.add("mx1.corp.example", "AAAA", "2001:db8::25")
        dns.add("mx2.corp.example", "A", "192.0.2.25")
        dns.add("mx2.corp.example", "AAAA", "2001:db8::26")
        assert await route(dns).targets() == [
            Target("mx1.corp.example", "2001:db8::25", 10),
            Target("mx2.corp.example", "192.0.2.25", 20),
            Target("mx2.corp.example", "2001:db8::26", 20),
        ]


async def test_a_host_whose_lookups_fail_is_skipped_and_all_failing_is_a_dns_failure():
    async with DnsServer() as dns:
        dns.add("corp.example", "MX", "10 mx1.corp.example.", "20 mx2.corp.example.")
        dns.add("mx2.corp.example", "A", "192.0.2.26")
        dns.servfail.add("mx1.corp.example")
        assert await route(dns).targets() == [Target("mx2.corp.example", "192.0.2.26", 20)]
        dns.servfail.add("mx2.corp.example")
        with pytest.raises(RouteError) as failed:
            await route(dns).targets()
        assert failed.value.reply == replies.UPSTREAM_DNS_FAILURE  # 451 4.4.3: ask again later
        assert "mx1.corp.example: A lookup" in failed.value.reason and "AAAA lookup" in failed.value.reason
        dns.clear()
        dns.add("corp.example", "MX", "10 mx1.corp.example.", "20 mx2.corp.example.")
        with pytest.raises(RouteError) as missing:  # hosts that do not exist: no route, not a DNS fault
            await route(dns).targets()
        assert missing.value.reply == replies.UPSTREAM_NO_ROUTE


async def test_a_failed_host_is_tried_first_again_once_its_record_expires():
    async with DnsServer() as dns:
        dns.add("corp.example", "MX", "10 mx1.corp.example.", "20 mx2.corp.example.")
        dns.add("mx1.corp.example", "A", "192.0.2.25")
        dns.add("mx2.corp.example", "A", "192.0.2.26")
        remembered, forgotten = route(dns), route(dns, down_seconds=0)
        for r in (remembered, forgotten):
            r.failed(Target("mx1.corp.example", "192.0.2.25", 10))
        assert [t.address for t in await remembered.targets()] == ["192.0.2.26", "192.0.2.25"]
        assert [t.address for t in await forgotten.targets()] == ["192.0.2.25", "192.0.2.26"]


async def test_a_host_that_answers_again_is_preferred_again(tmp_path, start_gate):
    async with DnsServer() as dns, mx_hosts(["127.0.0.2", "127.0.0.3"]) as (mx_port, sinks):
        both = ("10 mx1.corp.example.", "20 mx2.corp.example.")
        dns.add("corp.example", "MX", *both)
        dns.add("mx1.corp.example", "A", "127.0.0.2")
        dns.add("mx2.corp.example", "A", "127.0.0.3")
        text = CONFIG.format(port=0, mx_port=mx_port, resolver=dns.address, extra="")
        _, port = await start_gate(load_config(write_config(tmp_path, text)))
        await sinks["127.0.0.2"].stop()  # mx1 is down: mx2 takes the message, mx1 is tried last for a while
        assert await send_one(port, 1) == ("dot", "250 2.0.0 Ok: queued")
        assert len(sinks["127.0.0.3"].messages) == 1
        async with Sink(host="127.0.0.2", port=mx_port) as mx1:
            dns.clear()
            dns.add("corp.example", "MX", "10 mx1.corp.example.")  # only mx1 listed: it answers again
            dns.add("mx1.corp.example", "A", "127.0.0.2")
            assert await send_one(port, 2) == ("dot", "250 2.0.0 Ok: queued")
            dns.add("corp.example", "MX", "20 mx2.corp.example.")
            dns.add("mx2.corp.example", "A", "127.0.0.3")
            assert await send_one(port, 3) == ("dot", "250 2.0.0 Ok: queued")
            assert len(mx1.messages) == 2 and len(sinks["127.0.0.3"].messages) == 1
