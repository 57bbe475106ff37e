"""`upstream.url: mx:DOMAIN`: the domain's mail hosts, in the order RFC 5321 section 5.1 asks.

`MxRoute.targets()` looks up the domain's MX records with dnspython's asyncio
resolver, falls back to the domain's own A/AAAA records when it has no MX (the
implicit MX of RFC 5321 5.1), refuses a null MX (RFC 7505), sorts the hosts by
preference with equal preferences in random order, and lists every address of
every host. The pool (smtpgate.upstream.client) connects to them in that order.

Hosts that failed recently are moved to the end of the list, never dropped from
it: remembering a failure saves the next transactions a connect timeout on a
dead host, and can never make a delivery fail that trying that host would have
saved.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from smtpgate.config import parse_hostport
from smtpgate.mail import replies
from smtpgate.mail.replies import Reply

# How long a host that failed is tried after the others (docs/upstream.md): long
# enough that during an MX outage each transaction does not first wait out a connect
# timeout on it, short enough that mail is back on the preferred host within a minute
# of its recovery.
DOWN_SECONDS = 60.0


class RouteError(Exception):
    """The domain's hosts cannot be listed; `reply` is what the client hears at MAIL."""

    def __init__(self, reason: str, reply: Reply):
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


@dataclass(frozen=True)
class Target:
    """One address of one MX host."""

    host: str  # the MX host name, for TLS (SNI, certificate check) and the logs
    address: str
    preference: int


def order_exchanges(records: list[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """Lowest preference first; equal preferences in random order (RFC 5321 5.1); each host once."""
    groups: dict[int, list[str]] = {}
    for preference, host in records:
        groups.setdefault(preference, []).append(host)
    seen: set[str] = set()
    ordered: list[tuple[int, str]] = []
    for preference in sorted(groups):
        hosts = list(dict.fromkeys(groups[preference]))
        rng.shuffle(hosts)
        for host in hosts:
            if host.lower() not in seen:
                seen.add(host.lower())
                ordered.append((preference, host))
    return ordered


class MxRoute:
    """The mail hosts of one domain, and which of them failed lately."""

    def __init__(self, domain: str, *, port: int, resolver: str | None, lifetime: float,
                 rng: random.Random | None = None, down_seconds: float = DOWN_SECONDS):
        self.domain = domain
        self.down_seconds = down_seconds  # how long a failed address is tried after the others
        self.port = port
        self.rng = rng or random.Random()
        self.down: dict[str, float] = {}  # address -> monotonic time until which it is tried last
        self.resolver: dns.asyncresolver.Resolver | None = None
        self.resolver_problem: str | None = None
        try:
            self.resolver = dns.asyncresolver.Resolver(configure=resolver is None)
        except dns.exception.DNSException as exc:  # no /etc/resolv.conf
            self.resolver_problem = f"no DNS resolver: {exc}"
            return
        if resolver is not None:
            host, server_port = parse_hostport(resolver) or (resolver, 53)
            self.resolver.nameservers = [host]
            self.resolver.port = server_port
        self.resolver.lifetime = lifetime
        self.resolver.timeout = min(lifetime, 2.0)  # per try, so a lost UDP answer is asked again
        self.resolver.cache = dns.resolver.Cache()  # answers are kept for their TTL

    async def targets(self) -> list[Target]:
        """Every address to try, in order; raises RouteError when there is none to try."""
        hosts = order_exchanges(await self._exchanges(), self.rng)
        looked_up = await asyncio.gather(*(self._addresses(host) for _, host in hosts))
        targets: list[Target] = []
        seen: set[str] = set()
        failures: list[str] = []
        for (preference, host), (addresses, problem) in zip(hosts, looked_up):
            if problem:
                failures.append(f"{host}: {problem}")
            for address in addresses:
                if address not in seen:
                    seen.add(address)
                    targets.append(Target(host=host, address=address, preference=preference))
        if not targets:
            if failures:
                raise RouteError(f"address lookup for the MX hosts of {self.domain} failed: "
                                 + "; ".join(failures), replies.UPSTREAM_DNS_FAILURE)
            raise RouteError(f"no address for any MX host of {self.domain}", replies.UPSTREAM_NO_ROUTE)
        return self._healthy_first(targets)

    def failed(self, target: Target) -> None:
        self.down[target.address] = time.monotonic() + self.down_seconds

    def succeeded(self, target: Target) -> None:
        self.down.pop(target.address, None)

    def _healthy_first(self, targets: list[Target]) -> list[Target]:
        now = time.monotonic()
        for address, until in list(self.down.items()):
            if until <= now:
                del self.down[address]
        healthy = [t for t in targets if t.address not in self.down]
        failing = sorted((t for t in targets if t.address in self.down), key=lambda t: self.down[t.address])
        return healthy + failing

    async def _exchanges(self) -> list[tuple[int, str]]:
        if self.resolver is None:
            raise RouteError(self.resolver_problem or "no DNS resolver", replies.UPSTREAM_DNS_FAILURE)
        try:
            answer = await self.resolver.resolve(self.domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise RouteError(f"{self.domain}: no such domain (NXDOMAIN)", replies.UPSTREAM_NO_ROUTE) from None
        except dns.resolver.NoAnswer:
            return [(0, self.domain)]  # RFC 5321 5.1: no MX, the domain itself is the implicit MX
        except dns.exception.DNSException as exc:
            raise RouteError(f"MX lookup for {self.domain} failed: {type(exc).__name__}: {exc}",
                             replies.UPSTREAM_DNS_FAILURE) from None
        records = [(r.preference, r.exchange) for r in answer]
        # RFC 7505 3: "." as the exchange says the domain accepts no mail.
        real = [(p, name.to_text(omit_final_dot=True)) for p, name in records if name != dns.name.root]
        if not real:
            raise RouteError(f"{self.domain} publishes a null MX (RFC 7505)", replies.NULL_MX)
        return real

    async def _addresses(self, host: str) -> tuple[list[str], str | None]:
        """IPv4 then IPv6 addresses of host, and what went wrong when neither lookup answered."""
        found = await asyncio.gather(self._lookup(host, "A"), self._lookup(host, "AAAA"))
        addresses = [a for family, _ in found for a in family]
        problems = [p for _, p in found if p]
        return addresses, ("; ".join(problems) if problems and not addresses else None)

    async def _lookup(self, host: str, rdtype: str) -> tuple[list[str], str | None]:
        assert self.resolver is not None
        try:
            answer = await self.resolver.resolve(host, rdtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [], None
        except dns.exception.DNSException as exc:
            return [], f"{rdtype} lookup: {type(exc).__name__}"
        return [r.address for r in answer], None
