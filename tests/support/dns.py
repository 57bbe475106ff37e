"""A small authoritative DNS server on loopback for tests, built with dnspython's message API.

It answers UDP queries from a table the test controls, so `upstream.resolver`
can point smtpgate's real resolver at it::

    async with DnsServer() as dns:
        dns.add("corp.example", "MX", "10 mx1.corp.example.", "20 mx2.corp.example.")
        dns.add("mx1.corp.example", "A", "127.0.0.2")
        ...  # upstream: {url: mx:corp.example, resolver: dns.address}

A name with no record of any type is NXDOMAIN; a known name without the asked
type is an empty NOERROR answer (NODATA); a name in `servfail` gets SERVFAIL.
Answers, negative ones included (their SOA), carry TTL 0 unless `ttl` is changed,
so no resolver cache hides a change the test makes.
"""

from __future__ import annotations

import asyncio

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["DnsServer"]


class DnsServer(asyncio.DatagramProtocol):
    def __init__(self, host: str = "127.0.0.1", port: int = 0, ttl: int = 0):
        self.host = host
        self.port = port
        self.ttl = ttl
        self.records: dict[tuple[dns.name.Name, int], list[str]] = {}
        self.servfail: set[str] = set()
        self.queries: list[tuple[str, str]] = []  # (name, type) as asked, in order
        self._transport: asyncio.DatagramTransport | None = None

    @property
    def address(self) -> str:
        """host:port, the shape `upstream.resolver` takes."""
        return f"{self.host}:{self.port}"

    def add(self, name: str, rdtype: str, *values: str) -> None:
        """Add records, e.g. add("corp.example", "MX", "10 mx1.corp.example.") or an A record's address."""
        key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype))
        self.records.setdefault(key, []).extend(values)

    def clear(self) -> None:
        self.records.clear()
        self.servfail.clear()

    async def __aenter__(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, self.port))
        self.port = self._transport.get_extra_info("sockname")[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- asyncio.DatagramProtocol ----------------------------------------
    def datagram_received(self, data: bytes, addr) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:  # noqa: BLE001 - not a DNS message: no answer, like a real server
            return
        assert self._transport is not None
        self._transport.sendto(self.answer(query).to_wire(), addr)

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name, rdtype = question.name, question.rdtype
        self.queries.append((name.to_text(omit_final_dot=True), dns.rdatatype.to_text(rdtype)))
        if name.to_text(omit_final_dot=True) in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if not any(key_name == name for key_name, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())
            return response
        values = self.records.get((name, rdtype))
        if values:
            response.answer.append(dns.rrset.from_text_list(name, self.ttl, dns.rdataclass.IN, rdtype, values))
        else:
            response.authority.append(self._soa())
        return response

    def _soa(self) -> dns.rrset.RRset:
        # RFC 2308 3: a negative answer carries the SOA whose TTL and minimum say how long
        # it may be cached; `ttl` here too, so a record the test adds later is seen.
        soa = f"ns.test. hostmaster.test. 1 3600 600 86400 {self.ttl}"
        return dns.rrset.from_text(dns.name.root, self.ttl, dns.rdataclass.IN, dns.rdatatype.SOA, soa)
