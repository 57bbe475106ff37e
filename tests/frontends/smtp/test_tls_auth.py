"""TLS and AUTH on both sides: STARTTLS + AUTH for clients, smtps/starttls/login to the upstream."""

from __future__ import annotations

import asyncio
import dataclasses

import aiosmtplib
import pytest

from smtpgate.frontends.smtp.server import make_factory, tls_context
from smtpgate.users import Users, add_user
from tests.support.configs import tls_auth_yaml
from tests.support.pki import TestCA
from tests.support.sink import Sink, client_tls_context, make_test_tls
from tests.support.smtp import send
from tests.support.wire import Wire, code

BODY = b"Subject: tls\r\nMessage-ID: <tls@corp.example>\r\n\r\nbody\r\n"


def config_with_listener(tmp_path, sink_port: int, auth: str, networks: str = "[127.0.0.1/32]"):
    from smtpgate.config import load_config
    from tests.conftest import write_config

    return load_config(write_config(tmp_path, tls_auth_yaml(tmp_path, sink_port, auth, networks)))


async def test_auth_required_over_starttls(tmp_path, sink, start_gate, log_lines):
    gate, port = await start_gate(config_with_listener(tmp_path, sink.port, "required", "[]"))
    cafile = str(tmp_path / "tls" / "test-cert.pem")  # made by config_with_listener
    tls = client_tls_context(cafile)
    # Without AUTH: 530 at MAIL, even from loopback.
    refused = await send("127.0.0.1", port, mail_from="jane@corp.example", rcpt_tos=["b@x.example"],
                         data=BODY, starttls=True, tls_context=tls)
    assert refused.mail[0] == 530
    # Wrong password: 535, still nothing relayed.
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
        await send("127.0.0.1", port, mail_from="jane@corp.example", rcpt_tos=["b@x.example"],
                   data=BODY, starttls=True, tls_context=tls, login=("jane", "wrong"))
    assert info.value.code == 535
    good = await send("127.0.0.1", port, mail_from="jane@corp.example", rcpt_tos=["b@x.example"],
                      data=BODY, starttls=True, tls_context=tls, login=("jane", "s3cret pass"))
    assert good.data is not None and good.data[0] == 250
    [msg] = sink.messages
    assert b"with ESMTPSA id" in msg.data.split(b"\r\n\r\n")[0]
    log_text = str(log_lines())
    assert "s3cret" not in log_text


async def test_auth_not_offered_without_tls(tmp_path, sink, start_gate, log_lines):
    gate, port = await start_gate(config_with_listener(tmp_path, sink.port, "optional"))
    wire, _ = await Wire.open(port)
    ehlo = await wire.cmd("EHLO client.test")
    assert "250-STARTTLS" in ehlo and "AUTH" not in ehlo
    # Passwords never cross in clear: AUTH before STARTTLS is refused as needing encryption
    # (RFC 4954 6), which tells the client to start TLS first.
    refused = await wire.cmd("AUTH PLAIN AGphbmUAczNjcmV0IHBhc3M=")
    assert refused.startswith("538 5.7.11 "), refused
    assert not any(e["event"] == "auth.result" for e in log_lines())  # the password was not even checked
    # relay_networks still lets loopback relay without AUTH on an optional listener.
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250


async def starttls_session(port: int, cafile) -> tuple[Wire, str]:
    """A session after EHLO, STARTTLS and EHLO again, and the reply to that last EHLO."""
    wire, _ = await Wire.open(port)
    await wire.cmd("EHLO client.test")
    assert code(await wire.cmd("STARTTLS")) == 220
    await wire.writer.start_tls(client_tls_context(str(cafile)), server_hostname="localhost")
    return wire, await wire.cmd("EHLO client.test")


async def test_auth_none_listener_offers_no_auth_even_over_tls(tmp_path, sink, start_gate, log_lines):
    gate, port = await start_gate(config_with_listener(tmp_path, sink.port, "none"))
    wire, ehlo = await starttls_session(port, tmp_path / "tls" / "test-cert.pem")
    assert code(ehlo) == 250 and "AUTH" not in ehlo
    assert await wire.cmd("AUTH PLAIN AGphbmUAczNjcmV0IHBhc3M=") == "502 5.5.1 AUTH not available on this listener"
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250  # relay_networks: loopback relays
    await wire.close()


async def test_a_listener_without_a_password_backend_refuses_auth_with_535(tmp_path, sink, start_gate, log_lines):
    """Settings without an authenticator: the client is told its login failed, not left waiting."""
    config = config_with_listener(tmp_path, sink.port, "optional")
    gate, _ = await start_gate(config)
    [listener] = config.listeners
    settings = dataclasses.replace(gate.snapshot.smtp(listener), authenticator=None)
    factory, _ = make_factory(listener, lambda: settings, gate.registry, tls_context(listener))
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        wire, ehlo = await starttls_session(server.sockets[0].getsockname()[1], tmp_path / "tls" / "test-cert.pem")
        assert "250-AUTH LOGIN PLAIN" in ehlo
        await wire.send("AUTH PLAIN AGphbmUAczNjcmV0IHBhc3M=\r\n")  # jane's right password
        assert await wire.reply(timeout=5) == "535 5.7.8 Authentication credentials invalid"
        assert code(await wire.cmd("NOOP")) == 250
        await wire.close()
    finally:
        server.close()
    assert not any(e["event"] in ("auth.result", "auth.delayed") for e in log_lines())


async def test_a_verified_client_certificate_is_named_on_the_relayed_message(tmp_path, sink, start_gate, log_lines):
    ca = TestCA(tmp_path / "pki")
    from smtpgate.config import load_config
    from tests.conftest import write_config

    text = tls_auth_yaml(tmp_path, sink.port, "optional").replace(
        "    auth: optional\n", f"    auth: optional\n    tls_client_ca: {ca.cert}\n")
    gate, port = await start_gate(load_config(write_config(tmp_path, text)))
    tls = client_tls_context(str(tmp_path / "tls" / "test-cert.pem"))
    tls.load_cert_chain(*ca.client("mail.peer.test"))
    result = await send("127.0.0.1", port, mail_from="a@corp.example", rcpt_tos=["b@x.example"], data=BODY,
                        starttls=True, tls_context=tls)
    assert result.data[0] == 250
    [relayed] = [e for e in log_lines() if e["event"] == "message.relayed"]
    assert (relayed["client_cert"], relayed["client_cert_issuer"]) == ("CN=mail.peer.test", "CN=smtpgate test CA")


def test_users_file_roundtrip(tmp_path):
    path = tmp_path / "users"
    assert add_user(path, "jane", "one") is True
    assert add_user(path, "bob", "two") is True
    assert add_user(path, "jane", "three") is False
    users = Users.load(path)
    assert users.verify("jane", "three") and not users.verify("jane", "one")
    assert users.verify("bob", "two") and not users.verify("eve", "two")
    assert "three" not in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o640"  # root:smtpgate, systemd/README.md


async def upstream_config(tmp_path, url: str, extra: str = ""):
    from smtpgate.config import load_config
    from tests.conftest import write_config

    return load_config(write_config(tmp_path, f"""\
listeners:
  - name: submission
    address: 127.0.0.1:0
    relay_networks: [127.0.0.1/32]
upstream:
  url: {url}
{extra}internal_domains: [corp.example]
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
"""))


async def relay_one(port: int) -> tuple[int, str]:
    result = await send("127.0.0.1", port, mail_from="a@corp.example", rcpt_tos=["b@x.example"], data=BODY)
    return result.data if result.data else result.mail


async def test_upstream_smtps_with_ca_file(tmp_path, start_gate, log_lines):
    context, cafile = make_test_tls(tmp_path / "up")
    async with Sink(implicit_tls=context) as up:
        gate, port = await start_gate(await upstream_config(
            tmp_path, f"smtps://localhost:{up.port}", f"  ca_file: {cafile}\n"))
        assert (await relay_one(port))[0] == 250
        assert len(up.messages) == 1


async def test_upstream_starttls_and_login(tmp_path, start_gate, log_lines):
    context, cafile = make_test_tls(tmp_path / "up")
    (tmp_path / "up.secret").write_text("relay-pw\n")
    async with Sink(starttls_context=context, auth={"relay@corp.example": "relay-pw"}, require_auth=True) as up:
        gate, port = await start_gate(await upstream_config(
            tmp_path, f"smtp+starttls://localhost:{up.port}",
            f"  ca_file: {cafile}\n  username: relay@corp.example\n  password_file: up.secret\n"))
        assert (await relay_one(port))[0] == 250
        assert len(up.messages) == 1
        assert "relay-pw" not in str(log_lines())


async def test_upstream_certificate_verified_by_default(tmp_path, start_gate, log_lines):
    context, _ = make_test_tls(tmp_path / "up")
    async with Sink(implicit_tls=context) as up:
        gate, port = await start_gate(await upstream_config(tmp_path, f"smtps://localhost:{up.port}",
                                                            "  timeout: 3\n"))
        code_, text = await relay_one(port)
        assert code_ == 451 and text.startswith("4.4.1")
        assert up.messages == [] and up.commands == []
        # Refused because the self-signed certificate is not trusted, not for some other fault.
        [error] = [e for e in log_lines() if e["event"] == "upstream.error" and e["stage"] == "connect"]
        assert "CERTIFICATE_VERIFY_FAILED" in error["reason"], error


async def test_upstream_certificate_not_verified_with_verify_tls_false(tmp_path, start_gate, log_lines):
    """verify_tls: false: a self-signed certificate for another name is accepted; the
    connection is still encrypted."""
    context, _ = make_test_tls(tmp_path / "up")  # names localhost, signed by no CA smtpgate trusts
    async with Sink(implicit_tls=context) as up:
        gate, port = await start_gate(await upstream_config(tmp_path, f"smtps://127.0.0.1:{up.port}",
                                                            "  verify_tls: false\n"))
        assert (await relay_one(port))[0] == 250
        [msg] = up.messages
        assert msg.tls


async def test_upstream_starttls_not_offered_is_refused(tmp_path, start_gate, log_lines):
    """smtp+starttls:// to a server without STARTTLS: nothing is sent in clear after EHLO."""
    async with Sink() as up:
        gate, port = await start_gate(await upstream_config(tmp_path, f"smtp+starttls://localhost:{up.port}",
                                                            "  timeout: 3\n"))
        code_, text = await relay_one(port)
        assert code_ == 451 and text.startswith("4.4.1")
        assert up.messages == [] and {c.split()[0] for c in up.commands} == {"EHLO"}
        [error] = [e for e in log_lines() if e["event"] == "upstream.error" and e["stage"] == "connect"]
        assert error["reason"] == "localhost: STARTTLS not offered and TLS is required"


async def test_upstream_login_refused_is_temporary(tmp_path, start_gate, log_lines):
    (tmp_path / "up.secret").write_text("wrong\n")
    async with Sink(auth={"relay@corp.example": "relay-pw"}, require_auth=True) as up:
        gate, port = await start_gate(await upstream_config(
            tmp_path, f"smtp://127.0.0.1:{up.port}",
            "  username: relay@corp.example\n  password_file: up.secret\n"))
        code_, _ = await relay_one(port)
        assert code_ == 451
        assert up.messages == []


async def test_auth_inside_a_transaction_is_refused(tmp_path, sink, start_gate, log_lines):
    """RFC 4954 4: AUTH is not permitted during a mail transaction; the transaction goes on."""
    gate, port = await start_gate(config_with_listener(tmp_path, sink.port, "optional"))
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                             tls_context=client_tls_context(str(tmp_path / "tls" / "test-cert.pem")))
    await client.connect()
    try:
        await client.ehlo()
        await client.starttls()
        await client.ehlo()
        assert "auth" in client.esmtp_extensions
        assert (await client.mail("jane@corp.example")).code == 250
        # "jane" / "s3cret pass", good credentials: refused for where they come, not for what they are.
        refused = await client.execute_command(b"AUTH", b"PLAIN", b"AGphbmUAczNjcmV0IHBhc3M=")
        assert (refused.code, refused.message) == (503, "5.5.1 AUTH not allowed during a mail transaction")
        assert not any(e["event"] == "auth.result" for e in log_lines())
        assert (await client.rcpt("b@x.example")).code == 250
        assert (await client.data(BODY)).code == 250
        [msg] = sink.messages
        assert b"with ESMTPS id" in msg.data.split(b"\r\n\r\n")[0]  # relayed as not authenticated
    finally:
        await client.quit()
