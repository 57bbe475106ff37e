"""AUTH is checked off the event loop: a burst of logins does not hold up other sessions.

`smtpgate serve` runs as a process. Fifty clients finish STARTTLS and then all
send AUTH PLAIN (each check is a salted scrypt); only then does a client from
`relay_networks` start a whole transaction. Its 250 for the message comes
before the last AUTH is answered: the order of the replies shows it, not a
clock. Checked on the loop, the fifty scrypt runs would all come first.
"""

from __future__ import annotations

import asyncio
import base64

from tests.conftest import write_config
from tests.support.configs import tls_auth_yaml
from tests.support.process import ServeProcess
from tests.support.sink import Sink, client_tls_context
from tests.support.wire import Wire, code, free_port

LOGINS = 50
PASSWORD = "s3cret pass"  # jane's, as tls_auth_yaml sets it


async def logged_in_over_tls(port: int, tls, source: str) -> Wire:
    """A session that has done EHLO, STARTTLS and EHLO again, ready for AUTH."""
    wire, greeting = await Wire.open(port, source=source)
    assert code(greeting) == 220
    await wire.cmd("EHLO burst.test")
    assert code(await wire.cmd("STARTTLS")) == 220
    await wire.writer.start_tls(tls, server_hostname="localhost")
    ehlo = await wire.cmd("EHLO burst.test")
    assert "AUTH" in ehlo, ehlo
    return wire


async def test_relay_transaction_completes_while_logins_are_checked(tmp_path):
    order: list[str] = []

    async def await_auth(i: int, wire: Wire) -> None:
        reply = await wire.reply(timeout=120)
        order.append(f"auth {i} {code(reply)}")

    async def relay_transaction(port: int) -> None:
        wire, _ = await Wire.open(port)
        await wire.cmd("EHLO relay.test")
        assert code(await wire.cmd("MAIL FROM:<app@corp.example>")) == 250
        assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
        assert code(await wire.cmd("DATA")) == 354
        await wire.send(b"Subject: while logins are checked\r\n\r\nbody\r\n.\r\n")
        order.append(f"relay {code(await wire.reply())}")
        await wire.cmd("QUIT")

    async with Sink() as sink:
        port = free_port()
        config = write_config(tmp_path, tls_auth_yaml(tmp_path, sink.port, "optional", port=port))
        tls = client_tls_context(str(tmp_path / "tls" / "test-cert.pem"))
        async with ServeProcess(config):
            # Fifty clients at fifty addresses, as limits.max_connections_per_client expects of them.
            wires = await asyncio.gather(*(logged_in_over_tls(port, tls, f"127.0.1.{i + 1}") for i in range(LOGINS)))
            plain = base64.b64encode(f"\0jane\0{PASSWORD}".encode()).decode()
            for wire in wires:
                await wire.send(f"AUTH PLAIN {plain}\r\n")
            # Every AUTH is in before the relay client even connects.
            waiting = [asyncio.create_task(await_auth(i, wire)) for i, wire in enumerate(wires)]
            await relay_transaction(port)
            await asyncio.gather(*waiting)
            for wire in wires:
                await wire.close()

    assert sorted(order) == sorted([f"auth {i} 235" for i in range(LOGINS)] + ["relay 250"]), order
    assert order.index("relay 250") < len(order) - 1, f"the relay client waited for every login: {order}"
    assert len(sink.messages) == 1
