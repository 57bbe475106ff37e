"""upstream.auth: xoauth2 end to end over loopback.

A real token endpoint (aiohttp, client-credentials grant) issues random
tokens; a real SMTP sink accepts AUTH XOAUTH2 only with a token that
endpoint issued and has not revoked; a real smtpgate relays between a client
and that sink. Each test also reads smtpgate's captured log and checks that
neither the client secret nor any token appears in it.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiosmtplib
import pytest

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.support.sink import Sink
from tests.support.smtp import send
from tests.support.token_endpoint import TokenEndpoint
from tests.support.wire import free_port

CLIENT_ID = "0b6c6a51-smtpgate-test"
SECRET = "Zq8~secret.value-that-must-never-be-logged"
BODY = b"Subject: oauth\r\nMessage-ID: <oauth@corp.example>\r\n\r\nbody\r\n"


class Clock:
    """A monotonic clock the test moves by hand, starting at the real one."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def xoauth2_config(folder, sink_port: int, token_url: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "oauth.secret").write_text(SECRET + "\n")
    return load_config(write_config(folder, f"""\
hostname: relay.test.example
listeners:
  - name: submission
    address: 127.0.0.1:0
    relay_networks: [127.0.0.1/32]
upstream:
  url: smtp://127.0.0.1:{sink_port}
  timeout: 10
  pool_size: 0            # a new upstream connection, and so a new AUTH, for every message
  auth: xoauth2
  username: relay@corp.example
  oauth2:
    token_url: {token_url}
    client_id: {CLIENT_ID}
    client_secret_file: oauth.secret
internal_domains: [corp.example]
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
"""))


async def relay_one(port: int) -> tuple[int, str]:
    result = await send("127.0.0.1", port, mail_from="a@corp.example", rcpt_tos=["b@x.example"],
                        data=BODY, timeout=15)
    return result.data if result.data else result.mail


def assert_no_secrets(log_lines, endpoint: TokenEndpoint | None = None) -> str:
    text = json.dumps(log_lines())
    assert SECRET not in text
    for token in endpoint.issued if endpoint else ():
        assert token not in text
    return text


def events(log_lines, name: str) -> list[dict]:
    return [e for e in log_lines() if e.get("event") == name]


@pytest.fixture
async def endpoint():
    async with TokenEndpoint(client_id=CLIENT_ID, client_secret=SECRET) as e:
        yield e


async def test_one_token_for_many_messages(tmp_path, endpoint, start_gate, log_lines):
    async with Sink(xoauth2=endpoint.accepts, require_auth=True) as up:
        gate, port = await start_gate(xoauth2_config(tmp_path, up.port, endpoint.url))
        results = await asyncio.gather(*(relay_one(port) for _ in range(8)))
        results += [await relay_one(port) for _ in range(4)]
        assert [code for code, _ in results] == [250] * 12
        # One request to the token endpoint, as RFC 6749 4.4.2 asks for it.
        assert endpoint.requests == [{"grant_type": "client_credentials", "client_id": CLIENT_ID,
                                      "client_secret": SECRET,
                                      "scope": "https://outlook.office365.com/.default"}]
        [token] = endpoint.issued
        # The startup probe and twelve messages, each on its own connection, all with that token.
        assert up.auth_tokens == [token] * 13
        assert [m.auth_login for m in up.messages] == ["relay@corp.example"] * 12
        assert len(events(log_lines, "upstream.token_fetched")) == 1
        assert_no_secrets(log_lines, endpoint)


async def test_token_refreshed_before_and_after_expiry(tmp_path, endpoint, start_gate, log_lines):
    async with Sink(xoauth2=endpoint.accepts, require_auth=True) as up:
        gate, port = await start_gate(xoauth2_config(tmp_path, up.port, endpoint.url))
        tokens = gate.snapshot.pool.tokens
        clock = tokens.clock = Clock()  # the probe's token was timed on the real clock, which this continues
        assert (await relay_one(port))[0] == 250
        first = endpoint.issued[0]

        # Under five minutes before expiry (expires_in 3599): one refresh starts, held at the endpoint;
        # messages meanwhile go out with the token that is still valid, and start no second refresh.
        clock.advance(3310)
        endpoint.hold = asyncio.Event()
        assert (await relay_one(port))[0] == 250
        await endpoint.wait_for(lambda: len(endpoint.requests) == 2, what="refresh request")
        assert (await relay_one(port))[0] == 250
        assert len(endpoint.requests) == 2
        assert up.auth_tokens[-2:] == [first, first]
        endpoint.hold.set()
        endpoint.hold = None
        await tokens.settle()
        second = endpoint.issued[1]
        assert (await relay_one(port))[0] == 250
        assert up.auth_tokens[-1] == second

        # Past expiry: the upstream no longer takes the old token, and smtpgate waits for a new one.
        endpoint.revoke_all()
        clock.advance(3600)
        assert (await relay_one(port))[0] == 250
        assert len(endpoint.issued) == 3 and up.auth_tokens[-1] == endpoint.issued[2]
        assert len(up.messages) == 5
        assert_no_secrets(log_lines, endpoint)


async def test_token_endpoint_down_gives_451_4_7_0(tmp_path, start_gate, log_lines):
    port = free_port()
    endpoint = TokenEndpoint(client_id=CLIENT_ID, client_secret=SECRET, port=port)
    async with Sink(xoauth2=endpoint.accepts, require_auth=True) as up:
        gate, gate_port = await start_gate(xoauth2_config(tmp_path, up.port, endpoint.url))
        code, text = await relay_one(gate_port)
        assert (code, text) == (451, "4.7.0 Upstream authentication failed, try again later")
        assert up.auth_tokens == [] and up.messages == []
        [failed] = [e for e in events(log_lines, "upstream.auth_failed") if e.get("stage") == "connect"]
        assert "not reachable" in failed["reason"] and endpoint.url in failed["reason"]
        assert failed["upstream"] == f"smtp://127.0.0.1:{up.port}"

        # The endpoint comes back: the next MAIL fetches a token and the message goes out.
        await endpoint.start()
        try:
            assert (await relay_one(gate_port))[0] == 250
            assert up.auth_tokens == endpoint.issued
        finally:
            await endpoint.stop()
        assert_no_secrets(log_lines, endpoint)


async def test_token_endpoint_refusal_is_logged_without_the_secret(tmp_path, endpoint, start_gate, log_lines):
    # An endpoint that echoes the secret in its error must not put it into smtpgate's log.
    endpoint.failure = (401, {"error": "invalid_client",
                              "error_description": f"AADSTS7000215: Invalid client secret provided: {SECRET}\r\n"
                                                   "Trace ID: 6e3f"})
    async with Sink(xoauth2=endpoint.accepts, require_auth=True) as up:
        gate, port = await start_gate(xoauth2_config(tmp_path, up.port, endpoint.url))
        code, text = await relay_one(port)
        assert code == 451 and text.startswith("4.7.0 ")
        assert up.connections == 2 and up.auth_tokens == []  # connected (probe, MAIL), never authenticated
        failures = events(log_lines, "upstream.auth_failed")
        assert {e["stage"] for e in failures} == {"probe", "connect"}
        assert all("HTTP 401: invalid_client: AADSTS7000215" in e["reason"] for e in failures)
        assert all("[secret]" in e["reason"] and "Trace ID" not in e["reason"] for e in failures)
        assert_no_secrets(log_lines, endpoint)


async def test_revoked_token_is_replaced_once(tmp_path, endpoint, start_gate, log_lines):
    async with Sink(xoauth2=endpoint.accepts, require_auth=True) as up:
        gate, port = await start_gate(xoauth2_config(tmp_path, up.port, endpoint.url))
        assert (await relay_one(port))[0] == 250
        first = endpoint.issued[0]
        endpoint.revoke_all()  # the tenant revoked it long before it expires
        assert (await relay_one(port))[0] == 250
        second = endpoint.issued[1]
        assert up.auth_tokens == [first, first, first, second]  # probe, message, refused, retried
        assert len(up.messages) == 2
        assert_no_secrets(log_lines, endpoint)


async def test_a_token_never_accepted_is_not_retried(tmp_path, endpoint, start_gate, log_lines):
    # The upstream refuses every token (say SMTP.SendAsApp was never granted): each MAIL costs
    # one token request and one AUTH, never a burst of them.
    async with Sink(xoauth2=lambda user, token: False, require_auth=True) as up:
        gate, port = await start_gate(xoauth2_config(tmp_path, up.port, endpoint.url))
        for attempt in (2, 3):
            code, text = await relay_one(port)
            assert code == 451 and text.startswith("4.7.0 ")
            assert len(endpoint.requests) == attempt and up.auth_tokens == endpoint.issued
        failed = events(log_lines, "upstream.auth_failed")[-1]
        assert failed["reason"].startswith("login as relay@corp.example refused: 535 5.7.3")
        assert up.messages == []
        assert_no_secrets(log_lines, endpoint)


async def test_upstream_without_xoauth2_is_an_auth_failure(tmp_path, endpoint, start_gate, log_lines):
    async with Sink(auth={"relay@corp.example": "pw"}, require_auth=True) as up:
        gate, port = await start_gate(xoauth2_config(tmp_path, up.port, endpoint.url))
        code, text = await relay_one(port)
        assert code == 451 and text.startswith("4.7.0 ")
        assert endpoint.requests == []  # no token is asked for an upstream that cannot use it
        failed = events(log_lines, "upstream.auth_failed")[-1]
        assert failed["reason"] == f"smtp://127.0.0.1:{up.port} does not offer AUTH XOAUTH2"


async def test_sink_refuses_a_token_it_did_not_issue(endpoint):
    """The sink really checks the token: a client with a made-up one is refused."""
    async with Sink(xoauth2=endpoint.accepts, require_auth=True) as up:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=up.port, start_tls=False, timeout=10)
        await client.connect()
        try:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
                await client.auth_xoauth2("relay@corp.example", "made-up-token")
            assert info.value.code == 535
            assert (await client.execute_command(b"MAIL", b"FROM:<a@corp.example>")).code == 530
        finally:
            client.close()
