"""A reload swaps an immutable snapshot: new connections see the new configuration,
a session keeps the one it started with (docs/architecture.md)."""

from __future__ import annotations

import asyncio

from tests.support.sink import Sink
from tests.frontends.smtp.test_relay import wait_until


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



async def peer_serial(port: int, cafile: str) -> str:
    import ssl
    import subprocess

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"EHLO client.example\r\n")
    while (await reader.readline())[3:4] != b" ":
        pass
    writer.write(b"STARTTLS\r\n")
    await reader.readline()
    await writer.start_tls(ssl.create_default_context(cafile=cafile), server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    out = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=ssl.DER_cert_to_PEM_cert(der),
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


async def test_a_reload_serves_a_renewed_certificate_and_refuses_a_broken_one(tmp_path, sink, start_gate):
    import pytest

    from smtpgate.config import ConfigError, load_config
    from smtpgate.runtime.gate import ReloadRefused
    from tests.support.sink import make_test_cert
    from tests.frontends.smtp.test_tls_auth import config_with_listener

    config = config_with_listener(tmp_path, sink.port, "optional")
    gate, port = await start_gate(config)
    cert, key = str(tmp_path / "tls" / "test-cert.pem"), str(tmp_path / "tls" / "test-key.pem")
    first = await peer_serial(port, cert)
    make_test_cert(tmp_path / "tls")  # renewed in place, as certbot does
    gate.reload(load_config(config.path))
    second = await peer_serial(port, cert)
    assert second != first

    (tmp_path / "tls" / "test-key.pem").write_text("not a key\n")
    # SIGHUP's handler refuses it at load_config (config.rejected) ...
    with pytest.raises(ConfigError, match="listeners\\[0\\].tls_key: .* is not a PEM private key"):
        load_config(config.path)
    # ... and the gate too, should the pair break between that check and the swap.
    with pytest.raises(ReloadRefused, match="tls_cert/tls_key"):
        gate.reload(config)
    assert await peer_serial(port, cert) == second  # the old pair is still served
    assert key and second.startswith("serial=")
