"""auth_backend: upstream, what a client's AUTH leaves behind: the temporary failure's
`auth.result` and a session that goes on after it; the user a successful login names
on the messages it sends (smtpgate.frontends.smtp.auth.upstream_authenticator)."""

from __future__ import annotations

import base64

import aiosmtplib

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.support.sink import Sink, client_tls_context, make_test_tls
from tests.support.wire import Wire, code
from tests.upstream.test_auth_upstream import JANE, config_text, message


async def test_an_unreachable_upstream_is_logged_as_temporary_and_the_session_goes_on(tmp_path, start_gate,
                                                                                     log_lines):
    context, cafile = make_test_tls(tmp_path / "up")
    async with Sink(starttls_context=context, auth=dict([JANE]), require_auth=True) as up:
        port_of_dead_upstream = up.port
    gate, port = await start_gate(load_config(write_config(tmp_path, config_text(tmp_path, port_of_dead_upstream,
                                                                                 cafile))))
    wire, _ = await Wire.open(port)
    await wire.cmd("EHLO client.test")
    assert code(await wire.cmd("STARTTLS")) == 220
    await wire.writer.start_tls(client_tls_context(str(tmp_path / "tls" / "test-cert.pem")),
                                server_hostname="localhost")
    await wire.cmd("EHLO client.test")
    credentials = base64.b64encode(f"\0{JANE[0]}\0{JANE[1]}".encode()).decode()
    assert await wire.cmd("AUTH PLAIN " + credentials) == "454 4.7.0 Temporary authentication failure"
    # The 454 is the whole answer: the next command gets its own reply, nothing else comes first.
    assert (await wire.cmd("NOOP")).startswith("250 ")
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 530  # still not authenticated
    await wire.close()
    [result] = [e for e in log_lines() if e["event"] == "auth.result"]
    fields = ("level", "user", "success", "mechanism", "backend", "temporary")
    assert {k: result.get(k) for k in fields} == {
        "level": "warning", "user": JANE[0], "success": False, "mechanism": "PLAIN", "backend": "upstream",
        "temporary": True}
    assert str(port_of_dead_upstream) in result["reason"]
    assert result["session"]  # the session's own logger
    assert not any(e["event"] == "session.error" for e in log_lines())


async def test_the_upstream_login_names_the_user_on_what_it_sends(tmp_path, start_gate, log_lines):
    context, cafile = make_test_tls(tmp_path / "up")
    async with Sink(starttls_context=context, auth=dict([JANE]), require_auth=True) as up:
        gate, port = await start_gate(load_config(write_config(tmp_path, config_text(tmp_path, up.port, cafile))))
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                                 tls_context=client_tls_context(str(tmp_path / "tls" / "test-cert.pem")))
        await client.connect()
        await client.starttls()
        assert (await client.login(*JANE)).code == 235
        errors, reply = await client.sendmail(JANE[0], ["b@x.example"], message(0))
        assert not errors and reply.startswith("2")
        await client.quit()
        [delivered] = await up.wait_for_messages(1)
    received = delivered.data.split(b"\r\n\r\n")[0]
    assert b"with ESMTPSA id" in received  # RFC 3848: authenticated
    [relayed] = [e for e in log_lines() if e["event"] == "message.relayed"]
    assert relayed["sasl_username"] == JANE[0]
