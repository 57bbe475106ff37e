"""A reload swaps an immutable snapshot: new connections see the new configuration,
a session keeps the one it started with (docs/architecture.md)."""

from __future__ import annotations

import asyncio

from tests.support.sink import Sink
from tests.test_relay import wait_until


async def ehlo_keywords(port: int) -> set[str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"EHLO client.example\r\n")
    await writer.drain()
    keywords = set()
    while True:
        line = (await asyncio.wait_for(reader.readline(), 10)).decode()
        keywords.add(line[4:].split(" ", 1)[0].strip().upper())
        if line[3] == " ":
            break
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()
    return keywords


async def test_after_a_reload_to_another_upstream_ehlo_says_what_it_supports(sink, config_for, start_gate):
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}"))
    assert {"SMTPUTF8", "DSN"} <= await ehlo_keywords(port)
    async with Sink(smtputf8=False, dsn=False) as plain:
        gate.reload(config_for(f"smtp://127.0.0.1:{plain.port}"))
        await wait_until(lambda: gate.snapshot.pool.extensions is not None)
        keywords = await ehlo_keywords(port)
        assert "SMTPUTF8" not in keywords and "DSN" not in keywords

