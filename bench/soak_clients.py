"""The soak's clients: SMTP sessions that finish, that go away at each stage, that are slow.

Every message a client sends has its own Message-ID, and the client notes what it
was told (`Outcomes`): the reply to its final dot, or how it left. The soak then
holds the upstream's deliveries against these notes (bench/soak.py).
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field

# What a client may be told, or did, after its final dot without hearing 250, and
# a delivery of its message is still no breach: smtpgate relays a message whose dot
# is in to its end (the client gone), and a connection lost after the dot (upstream
# restarted, worker killed) is the documented "451 4.4.2 or lost, maybe delivered".
AFTER_THE_DOT = ("gone-after-dot", "451 4.4.2", "lost-after-dot")

SOURCES = [f"{700000 + n}-T" for n in range(40)]  # the linking sources the clients write from

SCENARIOS = {  # name: weight
    "message": 50,
    "after-ehlo": 6,
    "mail-wait": 6,
    "rcpt-wait": 6,
    "mid-data": 6,
    "after-dot": 6,
    "slow": 6,
}


class Gone(Exception):
    """The server closed the connection."""


@dataclass
class Outcomes:
    """What each message's client was told, by Message-ID, and how the sessions went."""

    by_message: dict[str, str] = field(default_factory=dict)
    scenarios: Counter = field(default_factory=Counter)
    results: Counter = field(default_factory=Counter)  # (scenario, result)
    probes: Counter = field(default_factory=Counter)
    next_id: int = 0

    def message_id(self, run: str) -> str:
        self.next_id += 1
        return f"<soak.{run}.{self.next_id}@soak.example>"


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> tuple[Client, str]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
        client = cls(reader, writer)
        return client, await client.reply()

    async def reply(self, timeout: float = 120) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise Gone("\n".join(lines))
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str) -> str:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    def leave(self, how: str) -> None:
        """Go away: a FIN, or a reset (SO_LINGER 0)."""
        if how == "reset":
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.writer.transport.abort()
        else:
            self.writer.close()


def message(message_id: str, source: str, n: int) -> bytes:
    body = b"".join(b"line %d of the soak message, padded to a usual length of text.\r\n" % i
                    for i in range(random.randint(5, 200)))
    return (f"From: Team A <uk-payroll+{source}@corp.example>\r\n"
            f"To: client{n}@supplier.example\r\n"
            f"Cc: pl-payroll@corp.example\r\n"
            f"Subject: soak {message_id}\r\n"
            f"Message-ID: {message_id}\r\n\r\n").encode() + body


def dot_stuffed(data: bytes) -> bytes:
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


async def run_scenario(port: int, scenario: str, outcomes: Outcomes, run: str) -> None:
    """One client session of the scenario; its result is counted, its message noted."""
    how = random.choice(("fin", "reset"))
    n = outcomes.next_id
    message_id = outcomes.message_id(run)
    source = random.choice(SOURCES)
    outcomes.scenarios[scenario] += 1
    try:
        result = await _session(port, scenario, how, message_id, source, n, outcomes)
    except Gone:
        result = "lost"
    except (ConnectionError, OSError):
        result = "lost"
    except TimeoutError:
        result = "client-timeout"
    outcomes.results[scenario, result] += 1


async def _session(port: int, scenario: str, how: str, message_id: str, source: str, n: int,
                   outcomes: Outcomes) -> str:
    client, greeting = await Client.open(port)
    try:
        if not greeting.startswith("220"):
            return "greeting " + greeting[:3]
        slow = scenario == "slow"
        await _pause(slow)
        await client.cmd("EHLO soak.client")
        if scenario == "after-ehlo":
            client.leave(how)
            return "left"
        sender = {"mail-wait": f"slow-mail-{n}@corp.example",
                  "rcpt-wait": f"slow-rcpt-{n}@corp.example"}.get(scenario, f"uk-payroll+{source}@corp.example")
        if scenario == "mail-wait":
            await client.send(f"MAIL FROM:<{sender}>\r\n".encode())
            await asyncio.sleep(0.3)  # the upstream answers MAIL after 1.5 s
            client.leave(how)
            return "left"
        await _pause(slow)
        reply = await client.cmd(f"MAIL FROM:<{sender}>")
        if not reply.startswith("250"):
            return "mail " + reply[:3]
        if scenario == "rcpt-wait":
            await client.send(b"RCPT TO:<pl-payroll@corp.example>\r\n")
            await asyncio.sleep(0.3)  # the upstream answers RCPT after 1.5 s
            client.leave(how)
            return "left"
        accepted = 0
        for rcpt in ("pl-payroll@corp.example", f"client{n}@supplier.example"):
            await _pause(slow)
            accepted += (await client.cmd(f"RCPT TO:<{rcpt}>")).startswith("250")
        if not accepted:
            await client.cmd("QUIT")
            return "rcpt refused"
        reply = await client.cmd("DATA")
        if not reply.startswith("354"):
            return "data " + reply[:3]
        return await _data(client, scenario, how, message_id, source, n, outcomes, slow)
    finally:
        client.writer.close()


async def _data(client: Client, scenario: str, how: str, message_id: str, source: str, n: int,
                outcomes: Outcomes, slow: bool) -> str:
    wire = dot_stuffed(message(message_id, source, n))
    if scenario == "mid-data":
        await client.send(wire[: len(wire) // 2])
        client.leave(how)
        outcomes.by_message[message_id] = "gone-mid-data"
        return "left"
    if slow:
        third = len(wire) // 3
        for piece in (wire[:third], wire[third:2 * third], wire[2 * third:]):
            await client.send(piece)
            await asyncio.sleep(random.uniform(0.3, 1.5))
    else:
        await client.send(wire)
    if scenario == "after-dot":
        client.leave(how)
        outcomes.by_message[message_id] = "gone-after-dot"
        return "left"
    outcomes.by_message[message_id] = "lost-after-dot"  # until a reply says otherwise
    reply = await client.reply()
    told = reply[:3] if reply.startswith("250") else reply[:9]
    outcomes.by_message[message_id] = told
    try:
        await client.cmd("QUIT")
    except (Gone, ConnectionError, OSError, TimeoutError):
        pass
    return told


async def _pause(slow: bool) -> None:
    if slow:
        await asyncio.sleep(random.uniform(0.5, 2.0))


async def probe(port: int, how: str) -> None:
    """A load balancer's health check: connect and go away before the greeting."""
    def connect_and_leave() -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    await asyncio.to_thread(connect_and_leave)
