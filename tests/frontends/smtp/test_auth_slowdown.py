"""Failed AUTH is slowed down per client address: a delay that doubles with each failure.

Shown without a stopwatch: the delays smtpgate logs double from failure to
failure, and a fresh address's failure is answered before the fifth failure
of an address that kept guessing, although it was sent after it.
"""

from __future__ import annotations

import asyncio
import base64

from smtpgate.config import load_config
from smtpgate.users import add_user
from tests.conftest import write_config
from tests.support.sink import client_tls_context, make_test_cert
from tests.support.wire import Wire, code

PASSWORD = "the right one"
BASE = 0.1  # limits.auth_failure_delay for this test


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def ready_for_auth(port: int, tls, source: str) -> Wire:
    wire, greeting = await Wire.open(port, source=source)
    assert code(greeting) == 220
    await wire.cmd("EHLO client.test")
    assert code(await wire.cmd("STARTTLS")) == 220
    await wire.writer.start_tls(tls, server_hostname="localhost")
    assert "AUTH" in await wire.cmd("EHLO client.test")
    return wire


async def start_submission(tmp_path, sink, start_gate, base: float) -> tuple[int, str]:
    """A STARTTLS listener with auth: required for jane and limits.auth_failure_delay: base;
    (its port, its certificate)."""
    cert, key = make_test_cert(tmp_path / "tls")
    add_user(tmp_path / "users", "jane", PASSWORD)
    gate, port = await start_gate(load_config(write_config(tmp_path, f"""\
listeners:
  - name: submission
    address: 127.0.0.1:0
    tls: starttls
    tls_cert: {cert}
    tls_key: {key}
    auth: required
users_file: users
upstream:
  url: smtp://127.0.0.1:{sink.port}
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
limits:
  auth_failure_delay: {base}
""")))
    return port, cert


async def test_failed_auth_slowed_down_per_client_address(tmp_path, sink, start_gate, log_lines):
    port, cert = await start_submission(tmp_path, sink, start_gate, BASE)
    tls = client_tls_context(cert)
    guesser = await ready_for_auth(port, tls, "127.0.0.1")
    for i in range(4):
        assert code(await guesser.cmd(plain("jane", f"guess {i}"))) == 535

    def delays(client: str) -> list[float]:
        return [e["delay_s"] for e in log_lines() if e["event"] == "auth.delayed" and e["client_ip"] == client]

    assert delays("127.0.0.1") == [BASE, 2 * BASE, 4 * BASE, 8 * BASE]

    # The fifth guess is held for 16 x BASE; a first failure from another address only BASE.
    newcomer = await ready_for_auth(port, tls, "127.0.0.2")
    order: list[str] = []

    async def answer(name: str, wire: Wire) -> None:
        order.append(f"{name} {code(await wire.reply())}")

    await guesser.send(plain("jane", "guess 4") + "\r\n")
    async with asyncio.timeout(10):
        while len(delays("127.0.0.1")) < 5:  # the server holds the guesser's answer now
            await asyncio.sleep(0.01)
    await newcomer.send(plain("jane", "typo") + "\r\n")
    await asyncio.gather(answer("guesser", guesser), answer("newcomer", newcomer))
    assert order == ["newcomer 535", "guesser 535"]
    assert delays("127.0.0.1")[-1] == 16 * BASE and delays("127.0.0.2") == [BASE]

    # The right password still works after the wait, and it is never logged.
    assert code(await guesser.cmd(plain("jane", PASSWORD))) == 235
    for wire in (guesser, newcomer):
        await wire.close()
    text = str(log_lines())
    assert PASSWORD not in text and "guess 4" not in text and "typo" not in text
    results = [e for e in log_lines() if e["event"] == "auth.result"]
    assert [e["success"] for e in results] == [False] * 6 + [True] and {e["user"] for e in results} == {"jane"}


async def test_the_logged_delay_is_rounded_to_milliseconds(tmp_path, sink, start_gate, log_lines):
    port, cert = await start_submission(tmp_path, sink, start_gate, 0.0012)
    wire = await ready_for_auth(port, client_tls_context(cert), "127.0.0.1")
    for i in range(2):
        assert code(await wire.cmd(plain("jane", f"guess {i}"))) == 535
    await wire.close()
    assert [e["delay_s"] for e in log_lines() if e["event"] == "auth.delayed"] == [0.001, 0.002]  # 1.2 ms, 2.4 ms
