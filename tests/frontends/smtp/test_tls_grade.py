"""The listener's TLS as a scanner sees it: Mozilla "intermediate" by default, tls_ciphers to differ.

The compliance test runs sslyze 6 (`--starttls smtp --mozilla_config
intermediate`) against a live STARTTLS listener on loopback, the way a new
user would grade a server; the other tests hand-shake with one cipher suite
or one group to show what is and is not offered, before and after a reload.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys

import pytest

from smtpgate.config import ConfigError, load_config
from tests.conftest import write_config
from tests.support.ci import needs
from tests.support.pki import TestCA
from tests.support.sink import make_test_cert
from tests.support.wire import Wire, code

CBC_SUITE = "ECDHE-ECDSA-AES128-SHA256"  # TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256, outside the profile


def tls_config(tmp_path, sink_port: int, ciphers: str | None = None, pair: tuple[str, str] | None = None):
    cert, key = pair or make_test_cert(tmp_path / "tls")
    extra = f"    tls_ciphers: \"{ciphers}\"\n" if ciphers is not None else ""
    return load_config(write_config(tmp_path, f"""\
hostname: relay.test.example
listeners:
  - name: submission
    address: 127.0.0.1:0
    tls: starttls
    tls_cert: {cert}
    tls_key: {key}
    relay_networks: [127.0.0.1/32]
{extra}upstream:
  url: smtp://127.0.0.1:{sink_port}
internal_domains: [corp.example]
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
limits:
  max_connections_per_client: 1000   # a scanner opens many connections at once
"""))


async def starttls_handshake(port: int, *, ciphers: str | None = None, group: str | None = None,
                             maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2) -> str | None:
    """STARTTLS with a client limited to `ciphers` or one ECDH `group`; the cipher agreed, or None."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.maximum_version = maximum
    if ciphers:
        client.set_ciphers(ciphers)
    if group:
        client.set_ecdh_curve(group)
    wire, greeting = await Wire.open(port)
    try:
        assert code(greeting) == 220
        assert code(await wire.cmd("EHLO client.test")) == 250
        assert code(await wire.cmd("STARTTLS")) == 220
        try:
            await wire.writer.start_tls(client, server_hostname="localhost")
        except (ssl.SSLError, ConnectionError):
            return None
        cipher = wire.writer.get_extra_info("cipher")
        assert code(await wire.cmd("EHLO client.test")) == 250  # the session goes on over TLS
        return cipher[0]
    finally:
        await wire.close()


async def test_sslyze_scan_passes_mozilla_intermediate(tmp_path, sink, start_gate, log_lines):
    try:
        import sslyze  # noqa: F401
    except ImportError:
        needs("sslyze", "it is in the test extra: pip install -e '.[test]'")
    # A leaf from a CA, as a real deployment has: the profile's checks include path validation.
    ca = TestCA(tmp_path / "pki")
    gate, port = await start_gate(tls_config(tmp_path, sink.port, pair=ca.server("localhost")))
    cafile = ca.cert
    report = tmp_path / "sslyze.json"
    scan = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sslyze", "--starttls", "smtp", "--mozilla_config", "intermediate",
        "--certinfo_ca_file", str(cafile), "--json_out", str(report), "--quiet", f"localhost:{port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(scan.communicate(), timeout=300)
    result = json.loads(report.read_text())
    [server] = result["server_scan_results"]
    assert server["scan_status"] == "COMPLETED", output.decode()
    commands = server["scan_result"]
    accepted = {s["cipher_suite"]["name"] for s in commands["tls_1_2_cipher_suites"]["result"]["accepted_cipher_suites"]}
    curves = {c["name"] for c in commands["elliptic_curves"]["result"]["supported_curves"]}
    # The two points the issue found, named, then the verdict of the whole profile.
    assert not any("CBC" in name for name in accepted), accepted
    assert curves == {"X25519", "secp256r1", "secp384r1"}, curves  # SECG names; secp256r1 is prime256v1
    for version in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        assert not commands[f"{version}_cipher_suites"]["result"]["is_tls_version_supported"], version
    assert commands["tls_1_3_cipher_suites"]["result"]["is_tls_version_supported"]
    assert scan.returncode == 0 and b"OK - Compliant." in output, output.decode()


async def test_cbc_suites_and_extra_curves_refused_by_default(tmp_path, sink, start_gate, log_lines):
    gate, port = await start_gate(tls_config(tmp_path, sink.port))
    assert await starttls_handshake(port, ciphers=CBC_SUITE) is None
    assert await starttls_handshake(port, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256") == "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert await starttls_handshake(port, group="prime256v1") is not None
    assert await starttls_handshake(port, group="secp521r1") is None
    events = [line["event"] for line in log_lines()]
    # A client the profile refuses is a warning without a traceback, not an internal error.
    assert "tls.handshake_failed" in events and "session.error" not in events


async def test_tls_ciphers_lets_an_operator_differ(tmp_path, sink, start_gate, log_lines):
    gate, port = await start_gate(tls_config(tmp_path, sink.port, ciphers=f"ECDHE-ECDSA-AES128-GCM-SHA256:{CBC_SUITE}"))
    assert await starttls_handshake(port, ciphers=CBC_SUITE) == CBC_SUITE
    assert await starttls_handshake(port, ciphers="ECDHE-ECDSA-CHACHA20-POLY1305") is None


async def test_reload_keeps_the_profile_and_takes_the_new_certificate(tmp_path, sink, start_gate, log_lines):
    config = tls_config(tmp_path, sink.port)
    gate, port = await start_gate(config)
    before = await peer_certificate(port)
    make_test_cert(tmp_path / "tls")  # a renewal: a new pair at the same paths
    gate.reload(load_config(config.path))
    after = await peer_certificate(port)
    assert after != before
    assert await starttls_handshake(port, ciphers=CBC_SUITE) is None
    assert await starttls_handshake(port, group="secp521r1") is None


async def peer_certificate(port: int) -> bytes:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    wire, _ = await Wire.open(port)
    try:
        await wire.cmd("EHLO client.test")
        await wire.cmd("STARTTLS")
        await wire.writer.start_tls(client, server_hostname="localhost")
        return wire.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        await wire.close()


def test_unusable_tls_ciphers_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        tls_config(tmp_path, 25, ciphers="NO-SUCH-SUITE")
    [problem] = info.value.problems
    assert "smtpgate.yaml:9: listeners[0].tls_ciphers: OpenSSL selects no cipher suite" in problem
