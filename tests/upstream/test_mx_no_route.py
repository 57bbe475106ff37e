"""`mx:` routing's finer points: the
reason and reply of each way a domain has no route, an address two hosts share, answers
kept for their TTL, and the resolver's settings. MxRoute asks the test's DNS server on
loopback (tests/support/dns.py) through dnspython's real resolver."""

from __future__ import annotations

import random
from pathlib import Path

import dns.resolver
import pytest

from smtpgate.mail import replies
from smtpgate.upstream.mx import MxRoute, RouteError, Target
from tests.support.dns import DnsServer


def route(dns_server: DnsServer, **kw) -> MxRoute:
    return MxRoute("corp.example", port=25, resolver=dns_server.address, lifetime=2, rng=random.Random(1), **kw)


async def refusal(dns_server: DnsServer) -> RouteError:
    with pytest.raises(RouteError) as failed:
        await route(dns_server).targets()
    return failed.value


async def test_each_way_to_have_no_route_has_its_reason_and_reply():
    async with DnsServer() as server:
        server.add("other.example", "A", "192.0.2.1")  # corp.example itself does not exist
        failed = await refusal(server)
        assert (failed.reason, failed.reply) == ("corp.example: no such domain (NXDOMAIN)", replies.UPSTREAM_NO_ROUTE)

        server.clear()
        server.add("corp.example", "MX", "0 .")
        failed = await refusal(server)
        assert (failed.reason, failed.reply) == ("corp.example publishes a null MX (RFC 7505)", replies.NULL_MX)

        server.clear()
        server.servfail.add("corp.example")
        failed = await refusal(server)
        assert failed.reply == replies.UPSTREAM_DNS_FAILURE
        assert failed.reason.startswith("MX lookup for corp.example failed: NoNameservers: "), failed.reason

        server.clear()
        server.add("corp.example", "MX", "10 mx1.corp.example.")  # a host that does not exist
        failed = await refusal(server)
        assert (failed.reason, failed.reply) == ("no address for any MX host of corp.example",
                                                 replies.UPSTREAM_NO_ROUTE)

        server.clear()
        server.add("corp.example", "MX", "10 mx1.corp.example.", "20 mx2.corp.example.")
        server.servfail.update({"mx1.corp.example", "mx2.corp.example"})
        failed = await refusal(server)
        assert failed.reply == replies.UPSTREAM_DNS_FAILURE
        assert failed.reason == (
            "address lookup for the MX hosts of corp.example failed: "
            "mx1.corp.example: A lookup: NoNameservers; AAAA lookup: NoNameservers; "
            "mx2.corp.example: A lookup: NoNameservers; AAAA lookup: NoNameservers")


async def test_without_mx_the_domain_itself_is_the_host_at_preference_zero():
    async with DnsServer() as server:
        server.add("corp.example", "A", "192.0.2.9")
        assert await route(server).targets() == [Target("corp.example", "192.0.2.9", 0)]


async def test_an_address_two_hosts_share_is_tried_once():
    async with DnsServer() as server:
        server.add("corp.example", "MX", "10 mx1.corp.example.", "20 mx2.corp.example.")
        server.add("mx1.corp.example", "A", "192.0.2.25")
        server.add("mx2.corp.example", "A", "192.0.2.25", "192.0.2.26")
        assert await route(server).targets() == [Target("mx1.corp.example", "192.0.2.25", 10),
                                                 Target("mx2.corp.example", "192.0.2.26", 20)]


async def test_answers_are_kept_for_their_ttl():
    async with DnsServer(ttl=300) as server:
        server.add("corp.example", "MX", "10 mx1.corp.example.")
        server.add("mx1.corp.example", "A", "192.0.2.25")
        mx = route(server)
        first = await mx.targets()
        asked = len(server.queries)
        assert await mx.targets() == first
        assert len(server.queries) == asked  # nothing asked again


def test_the_resolver_settings():
    mx = MxRoute("corp.example", port=25, resolver="127.0.0.1", lifetime=10)
    assert mx.resolver.nameservers == ["127.0.0.1"] and mx.resolver.port == 53  # no port: DNS's own
    assert (mx.resolver.lifetime, mx.resolver.timeout) == (10, 2.0)  # a lost answer is asked again after 2 s
    short = MxRoute("corp.example", port=25, resolver="127.0.0.1:5353", lifetime=1)
    assert (short.resolver.port, short.resolver.timeout) == (5353, 1)


@pytest.mark.skipif(not Path("/etc/resolv.conf").is_file(), reason="no system resolver configuration")
def test_without_upstream_resolver_the_systems_resolvers_are_asked():
    mx = MxRoute("corp.example", port=25, resolver=None, lifetime=10)
    assert mx.resolver is not None and mx.resolver.nameservers == dns.resolver.Resolver().nameservers


async def test_a_machine_without_resolver_configuration_has_no_route_and_says_why(monkeypatch):
    def no_configuration(self, *args, **kwargs):  # dnspython finding no /etc/resolv.conf
        raise dns.resolver.NoResolverConfiguration("no nameservers")

    monkeypatch.setattr(dns.resolver.BaseResolver, "read_resolv_conf", no_configuration)
    mx = MxRoute("corp.example", port=25, resolver=None, lifetime=2)
    assert mx.resolver is None
    with pytest.raises(RouteError) as failed:
        await mx.targets()
    assert (failed.value.reason, failed.value.reply) == ("no DNS resolver: no nameservers",
                                                         replies.UPSTREAM_DNS_FAILURE)
