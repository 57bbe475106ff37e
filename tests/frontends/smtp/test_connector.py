"""Connector mode against real peers: client certificates made by the test's own CA, the
tenant guard, and the processing stamp (docs/connectors.md)."""

from __future__ import annotations

import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiosmtplib
import pytest

from smtpgate.config import load_config
from smtpgate.mail.headers import parse_header_block
from smtpgate.mail.msgid import message_id_of
from smtpgate.mail.stamp import make_stamp, verify_stamp
from tests.conftest import write_config
from tests.support.configs import TEAMS_A_B
from tests.support.pki import TestCA
from tests.support.smtp import send

SECRET = "a-stamp-secret-shared-by-every-node"
TENANT = "6f1c7c4e-1d2b-4c5e-9a3f-2b7c1d0e9a11"
PEER = "mail.peer.test"
SENDER = "uk-payroll+101203-T@corp.example"


def message(msgid: str, *extra: str, subject: str = "Payroll question") -> bytes:
    fields = [f"From: UK Payroll <{SENDER}>", "To: PL Payroll <pl-payroll@corp.example>",
              f"Subject: {subject}", f"Message-ID: {msgid}", *extra]
    return ("\r\n".join(fields) + "\r\n\r\nHello Team B\r\n").encode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Our CA (server certificate, client certificates) and another CA."""
    folder = tmp_path_factory.mktemp("pki")
    ours, other = TestCA(folder / "ours"), TestCA(folder / "other", name="another CA")
    now = datetime.now(timezone.utc)
    return {
        "ca": ours.cert, "server": ours.server("localhost"),
        "right": ours.client(PEER), "other-name": ours.client("mail.stranger.test"),
        "other-ca": other.client(PEER),
        "expired": ours.client_dated(PEER, now - timedelta(days=3), now - timedelta(days=1)),
        "not-yet-valid": ours.client_dated(PEER, now + timedelta(days=1), now + timedelta(days=3)),
    }


def gate_config(tmp_path: Path, upstream: str, listener: str = "", top: str = "", store: str = ""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "stamp.key").write_text(SECRET + "\n")
    text = f"""\
hostname: relay.test.example
listeners:
  - name: connector
    address: 127.0.0.1:0
{listener or "    relay_networks: [127.0.0.1/32]"}
upstream:
  url: {upstream}
  timeout: 10
stamp:
  secret_file: stamp.key
store:
  url: {store or f"sqlite:{tmp_path}/smtpgate.db"}
  auto_upgrade: true
{top}""" + TEAMS_A_B
    return load_config(write_config(tmp_path, text))


def tls_listener(pki, *, client_ca: bool = True, tls: str = "starttls", extra: str = "") -> str:
    cert, key = pki["server"]
    lines = [f"    tls: {tls}", f"    tls_cert: {cert}", f"    tls_key: {key}"]
    if client_ca:
        lines += [f"    tls_client_ca: {pki['ca']}", f"    relay_client_cert_names: [{PEER}, '*.relay.test']"]
    return "\n".join(lines) + "\n" + extra


def client_tls(pki, which: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if which is not None:
        context.load_cert_chain(*pki[which])
    return context


def events(log_lines, name: str) -> list[dict]:
    return [e for e in log_lines() if e["event"] == name]


# ------------------------------------------------------------------ client certificates


async def test_a_verified_certificate_with_a_listed_name_relays(tmp_path, pki, sink, start_gate, log_lines):
    _, port = await start_gate(gate_config(tmp_path, f"smtp://127.0.0.1:{sink.port}", tls_listener(pki)))
    result = await send("127.0.0.1", port, mail_from=SENDER, rcpt_tos=["client@supplier.example"],
                        data=message("<cert1@corp.example>"), starttls=True, tls_context=client_tls(pki, "right"))
    assert result.mail[0] == 250 and result.data[0] == 250
    [tls] = events(log_lines, "session.tls")
    assert tls["client_cert"] == f"CN={PEER}" and tls["client_cert_issuer"] == "CN=smtpgate test CA"
    assert tls["tls_version"].startswith("TLSv1.") and tls["cipher"]
    [relayed] = events(log_lines, "message.relayed")
    assert relayed["client_cert"] == f"CN={PEER}" and relayed["client_cert_issuer"] == "CN=smtpgate test CA"


@pytest.mark.parametrize("which", ["other-name", None])
async def test_another_name_or_no_certificate_gets_530_at_mail(which, tmp_path, pki, sink, start_gate, log_lines):
    _, port = await start_gate(gate_config(tmp_path, f"smtp://127.0.0.1:{sink.port}", tls_listener(pki)))
    result = await send("127.0.0.1", port, mail_from=SENDER, rcpt_tos=["client@supplier.example"],
                        data=message("<cert2@corp.example>"), starttls=True, tls_context=client_tls(pki, which))
    assert result.mail[0] == 530 and result.data is None
    assert sink.messages == []
    [tls] = events(log_lines, "session.tls")
    assert tls["client_cert"] == ("CN=mail.stranger.test" if which else None)


@pytest.mark.parametrize("which", ["other-ca", "expired", "not-yet-valid"])
async def test_a_certificate_that_does_not_verify_ends_the_handshake(which, tmp_path, pki, sink, start_gate,
                                                                    log_lines):
    _, port = await start_gate(gate_config(tmp_path, f"smtp://127.0.0.1:{sink.port}", tls_listener(pki)))
    with pytest.raises((aiosmtplib.SMTPException, ConnectionError, ssl.SSLError)):
        await send("127.0.0.1", port, mail_from=SENDER, rcpt_tos=["client@supplier.example"],
                   data=message("<cert3@corp.example>"), starttls=True, tls_context=client_tls(pki, which))
    assert sink.messages == []
    assert events(log_lines, "session.tls") == []
    [failed] = events(log_lines, "tls.handshake_failed")
    assert "certificate" in failed["reason"].lower()


async def test_implicit_tls_names_the_certificate_on_session_opened(tmp_path, pki, sink, start_gate, log_lines):
    listener = tls_listener(pki, tls="implicit")
    _, port = await start_gate(gate_config(tmp_path, f"smtp://127.0.0.1:{sink.port}", listener))
    result = await send("127.0.0.1", port, mail_from=SENDER, rcpt_tos=["client@supplier.example"],
                        data=message("<cert4@corp.example>"), implicit_tls=True, tls_context=client_tls(pki, "right"))
    assert result.data[0] == 250
    [opened] = events(log_lines, "session.opened")
    assert opened["client_cert"] == f"CN={PEER}" and opened["client_cert_issuer"] == "CN=smtpgate test CA"


async def test_a_certificate_on_a_listener_without_tls_client_ca_is_ignored(tmp_path, pki, sink, start_gate,
                                                                           log_lines):
    listener = tls_listener(pki, client_ca=False, extra="    relay_networks: [127.0.0.1/32]\n")
    _, port = await start_gate(gate_config(tmp_path, f"smtp://127.0.0.1:{sink.port}", listener))
    result = await send("127.0.0.1", port, mail_from=SENDER, rcpt_tos=["client@supplier.example"],
                        data=message("<cert5@corp.example>"), starttls=True, tls_context=client_tls(pki, "expired"))
    assert result.data[0] == 250  # relayed by relay_networks; the certificate was never asked for
    [tls] = events(log_lines, "session.tls")
    assert tls["client_cert"] is None
    assert "client_cert" not in events(log_lines, "message.relayed")[0]


# ------------------------------------------------------------------ the tenant guard

GUARD = f"""\
    relay_networks: [127.0.0.1/32]
    required_headers:
      X-MS-Exchange-CrossTenant-Id: [{TENANT}]
"""


@pytest.mark.parametrize("fields, reason", [
    ((), "missing"),
    (("X-MS-Exchange-CrossTenant-Id: 00000000-0000-0000-0000-000000000000",), "not an accepted value"),
    ((f"X-MS-Exchange-CrossTenant-Id: {TENANT}", "X-MS-Exchange-CrossTenant-Id: 00000000-0000-0000-0000-000000000000"),
     "present 2 times"),
])
async def test_the_tenant_guard_refuses_before_any_link(fields, reason, tmp_path, sink, start_gate, log_lines):
    gate, port = await start_gate(gate_config(tmp_path, f"smtp://127.0.0.1:{sink.port}", GUARD))
    result = await send("127.0.0.1", port, mail_from=SENDER, rcpt_tos=["pl-payroll@corp.example"],
                        data=message("<guard@corp.example>", *fields))
    assert result.data[0] == 550 and result.data[1].startswith("5.7.1")
    assert sink.messages == []
    [rejected] = events(log_lines, "message.rejected")
    assert "X-MS-Exchange-CrossTenant-Id" in rejected["reason"] and reason in rejected["reason"]
    assert await gate.store.show("101203-T") is None  # another tenant's mail leaves no trace


async def test_the_tenant_guard_passes_the_right_tenant(tmp_path, sink, start_gate, log_lines):
    gate, port = await start_gate(gate_config(tmp_path, f"smtp://127.0.0.1:{sink.port}", GUARD))
    result = await send("127.0.0.1", port, mail_from=SENDER, rcpt_tos=["pl-payroll@corp.example"],
                        data=message("<guard@corp.example>", f"X-MS-Exchange-CrossTenant-Id: {TENANT}"))
    assert result.data[0] == 250
    [received] = sink.messages
    assert received.rcpt_tos == ["pl-payroll+900000-T@corp.example"]


# ------------------------------------------------------------------ the stamp


def stamps(data: bytes) -> list[str]:
    return parse_header_block(data).get_all("X-Smtpgate-Processed")


def assert_one_valid_stamp(data: bytes) -> None:
    block = parse_header_block(data)
    [value] = stamps(data)
    assert verify_stamp(SECRET.encode(), message_id_of(block.get("Message-ID")), value)


async def test_the_stamp_is_added_once_and_a_stamped_message_passes_untouched(tmp_path, sink, start_gate,
                                                                             log_lines):
    gate, port = await start_gate(gate_config(tmp_path, f"smtp://127.0.0.1:{sink.port}"))
    first = await send("127.0.0.1", port, mail_from=SENDER, rcpt_tos=["pl-payroll@corp.example"],
                       data=message("<first@corp.example>"))
    assert first.data[0] == 250
    [processed] = sink.messages
    assert processed.rcpt_tos == ["pl-payroll+900000-T@corp.example"]
    assert_one_valid_stamp(processed.data)
    messages_before = len((await gate.store.show("101203-T")).messages)
    # The same message back (a hairpin whose rule missed the stamp), its team mailbox untagged:
    # the link exists now, so RCPT is tagged on the way in and the envelope is replayed as given.
    sink.reset()
    again = await send("127.0.0.1", port, mail_from=SENDER, rcpt_tos=["pl-payroll@corp.example"],
                       data=processed.data)
    assert again.data[0] == 250
    [passed] = sink.messages
    assert passed.rcpt_tos == ["pl-payroll@corp.example"]
    received, rest = passed.data.split(b"\r\n", 1)[0], passed.data.split(b"\r\n", 3)[3]
    assert received.startswith(b"Received: from client.test") and rest == processed.data  # nothing else changed
    [already] = events(log_lines, "message.already_processed")
    assert already["message_id"] == "<first@corp.example>"
    assert events(log_lines, "message.relayed")[-1]["already_processed"] is True
    assert len((await gate.store.show("101203-T")).messages) == messages_before  # no record


async def test_a_stamp_copied_onto_another_message_is_replaced_and_the_message_linked(tmp_path, sink, start_gate,
                                                                                      log_lines):
    gate, port = await start_gate(gate_config(tmp_path, f"smtp://127.0.0.1:{sink.port}"))
    copied = f"X-Smtpgate-Processed: {make_stamp(SECRET.encode(), '<original@corp.example>')}"
    result = await send("127.0.0.1", port, mail_from=SENDER, rcpt_tos=["pl-payroll@corp.example"],
                        data=message("<other@corp.example>", copied))
    assert result.data[0] == 250
    [received] = sink.messages
    assert received.rcpt_tos == ["pl-payroll+900000-T@corp.example"]
    assert_one_valid_stamp(received.data)
    assert copied.encode() not in received.data
    [invalid] = events(log_lines, "stamp.invalid")
    assert "does not verify" in invalid["reason"]
    view = await gate.store.show("101203-T")
    assert [link.reference for link in view.links] == ["900000-T"]


@pytest.mark.parametrize("fields, reason", [
    (("X-Smtpgate-Processed: {good}", "X-Smtpgate-Processed: {good}"), "2 X-Smtpgate-Processed fields"),
    (("X-Smtpgate-Processed: v1:garbage",), "not a v1 stamp"),
    (("X-Smtpgate-Processed: v1:" + "\r\n\t".join(["A" * 70] * 60),), "characters"),  # folded: 4 kB
])
async def test_a_repeated_malformed_or_oversized_stamp_is_removed(fields, reason, tmp_path, sink, start_gate,
                                                                  log_lines):
    _, port = await start_gate(gate_config(tmp_path, f"smtp://127.0.0.1:{sink.port}"))
    good = make_stamp(SECRET.encode(), "<bad@corp.example>")
    result = await send("127.0.0.1", port, mail_from=SENDER, rcpt_tos=["pl-payroll@corp.example"],
                        data=message("<bad@corp.example>", *(f.format(good=good) for f in fields)))
    assert result.data[0] == 250
    [received] = sink.messages
    assert received.rcpt_tos == ["pl-payroll+900000-T@corp.example"]  # processed normally
    assert_one_valid_stamp(received.data)
    assert reason in events(log_lines, "stamp.invalid")[0]["reason"]


async def test_observe_mode_says_a_stamp_exempts_the_message(tmp_path, sink, start_gate, log_lines):
    _, port = await start_gate(gate_config(tmp_path, f"smtp://127.0.0.1:{sink.port}", top="mode: observe\n"))
    stamped = message("<seen@corp.example>", f"X-Smtpgate-Processed: {make_stamp(SECRET.encode(), '<seen@corp.example>')}")
    result = await send("127.0.0.1", port, mail_from=SENDER, rcpt_tos=["pl-payroll@corp.example"], data=stamped)
    assert result.data[0] == 250
    [observed] = events(log_lines, "message.observed")
    assert "valid stamp" in observed["exempt"]
    assert sink.messages[0].data.endswith(stamped)


class LoopingRouter:
    """A mail system in a hairpin, as a test double: a message without the stamp header goes to
    smtpgate, a message with it is delivered (kept here). smtpgate's upstream is this router."""

    def __init__(self) -> None:
        self.delivered: list[tuple[list[str], bytes]] = []
        self.routed = 0
        self.gate_port = 0
        self.server = None

    async def start(self) -> int:
        import asyncio

        from aiosmtpd.smtp import SMTP

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: SMTP(self, decode_data=False, hostname="router.test"),
                                               "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def handle_DATA(self, server, session, envelope) -> str:
        data = envelope.original_content
        if parse_header_block(data).get("X-Smtpgate-Processed") is not None:
            self.delivered.append((list(envelope.rcpt_tos), data))
            return "250 2.0.0 delivered"
        self.routed += 1
        if self.routed > 1000:  # a loop: the test fails on the counts, not by hanging
            return "554 5.4.6 routing loop"
        try:
            await aiosmtplib.send(data, sender=envelope.mail_from, recipients=envelope.rcpt_tos,
                                  hostname="127.0.0.1", port=self.gate_port, timeout=10)
        except aiosmtplib.SMTPException as exc:
            return f"451 4.4.0 smtpgate: {exc}"
        return "250 2.0.0 routed through smtpgate"


async def test_a_looping_hairpin_relays_100_messages_once_each(tmp_path, start_gate, log_lines):
    import asyncio

    router = LoopingRouter()
    router_port = await router.start()
    try:
        _, router.gate_port = await start_gate(gate_config(tmp_path, f"smtp://127.0.0.1:{router_port}"))

        async def session(first: int) -> None:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=router_port, timeout=30) as client:
                for n in range(first, first + 20):
                    await client.sendmail(SENDER, ["pl-payroll@corp.example"], message(f"<loop{n}@corp.example>"))

        await asyncio.gather(*(session(first) for first in range(0, 100, 20)))
    finally:
        router.server.close()
    assert router.routed == 100 and len(router.delivered) == 100
    for rcpts, data in router.delivered:
        assert rcpts == ["pl-payroll+900000-T@corp.example"]
        assert_one_valid_stamp(data)
    assert len(events(log_lines, "message.relayed")) == 100
    assert events(log_lines, "message.already_processed") == []


# ------------------------------------------------------------------ the milter front end


async def milter_actions(tmp_path, start_gate, data: bytes, listener_extra: str = "") -> list[tuple]:
    from tests.support.milter import MilterClient

    listener = "    kind: milter\n" + listener_extra
    config = gate_config(tmp_path, "maildir:outbox", listener)
    _, port = await start_gate(config)
    client = await MilterClient.open(port)
    try:
        await client.negotiate()
        await client.connect()
        return await client.message(SENDER, ["pl-payroll@corp.example"], data)
    finally:
        await client.quit()


async def test_the_milter_stamps_and_passes_stamped_messages(tmp_path, start_gate, log_lines):
    actions = await milter_actions(tmp_path, start_gate, message("<milter@corp.example>"))
    [stamp] = [a for a in actions if a[:2] == ("ADDHEADER", "X-Smtpgate-Processed")]
    assert verify_stamp(SECRET.encode(), "<milter@corp.example>", stamp[2].decode().strip())
    assert ("ADDRCPT_PAR", "<pl-payroll+900000-T@corp.example>", "ORCPT=rfc822;pl-payroll@corp.example") in actions
    stamped = message("<milter@corp.example>", "X-Smtpgate-Processed:" + stamp[2].decode())
    assert await milter_actions(tmp_path / "again", start_gate, stamped) == [("ACCEPT",)]
    assert events(log_lines, "message.already_processed")[0]["message_id"] == "<milter@corp.example>"


async def test_the_milter_replaces_a_copied_stamp(tmp_path, start_gate, log_lines):
    copied = make_stamp(SECRET.encode(), "<original@corp.example>")
    actions = await milter_actions(tmp_path, start_gate,
                                   message("<copy@corp.example>", f"X-Smtpgate-Processed: {copied}"))
    assert ("CHGHEADER", 1, "X-Smtpgate-Processed", b"") in actions  # an empty value deletes the field
    [stamp] = [a for a in actions if a[:2] == ("ADDHEADER", "X-Smtpgate-Processed")]
    assert verify_stamp(SECRET.encode(), "<copy@corp.example>", stamp[2].decode().strip())


async def test_the_milter_applies_the_tenant_guard(tmp_path, start_gate, log_lines):
    guard = f"    required_headers:\n      X-MS-Exchange-CrossTenant-Id: [{TENANT}]\n"
    actions = await milter_actions(tmp_path, start_gate, message("<m-guard@corp.example>"), guard)
    assert actions == [("REPLYCODE", "550 5.7.1 Message not accepted from this organisation")]


# ------------------------------------------------------------------ check-config


def check_config(tmp_path: Path, pki, listener: str, top: str = ""):
    import subprocess
    import sys

    (tmp_path / "stamp.key").write_text(SECRET)
    path = write_config(tmp_path, f"""\
listeners:
  - name: connector
    address: 127.0.0.1:2525
{listener}upstream:
  url: smtp://127.0.0.1:25
{top}""")
    return subprocess.run([sys.executable, "-m", "smtpgate", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("listener, problem", [
    ("    relay_client_cert_names: [mail.peer.test]\n", "listeners[0].relay_client_cert_names: needs tls_client_ca"),
    ("    tls_client_ca: {ca}\n    relay_client_cert_names: [mail.peer.test]\n",
     "listeners[0].tls_client_ca: needs tls: starttls or implicit"),
    ("    required_headers: [X-MS-Exchange-CrossTenant-Id]\n", "listeners[0].required_headers: expected a mapping"),
    ("    required_headers:\n      X-MS-Exchange-CrossTenant-Id: []\n", "give at least one accepted value"),
    ("    relay_client_cert_names: ['mail peer']\n    tls_client_ca: {ca}\n", "expected a DNS name"),
])
def test_check_config_refuses_connector_keys_that_cannot_work(listener, problem, tmp_path, pki):
    result = check_config(tmp_path, pki, listener.format(ca=pki["ca"]))
    assert result.returncode == 2 and problem in result.stderr, result.stderr
    assert "smtpgate.yaml:" in result.stderr


def test_check_config_refuses_a_short_stamp_secret(tmp_path, pki):
    (tmp_path / "short.key").write_text("too short\n")
    result = check_config(tmp_path, pki, "", "stamp:\n  secret_file: short.key\n")
    assert result.returncode == 2 and "stamp.secret_file:" in result.stderr and "at least 16" in result.stderr


def test_check_config_refuses_a_stamp_header_smtpgate_reads(tmp_path, pki):
    result = check_config(tmp_path, pki, "", "stamp:\n  header: Message-ID\n  secret_file: stamp.key\n")
    assert result.returncode == 2 and "stamp.header: Message-ID is a field smtpgate reads" in result.stderr


def test_check_config_warns_of_a_microsoft_certificate_without_required_headers(tmp_path, pki):
    cert, key = pki["server"]
    tls = f"    tls: starttls\n    tls_cert: {cert}\n    tls_key: {key}\n    tls_client_ca: {pki['ca']}\n"
    result = check_config(tmp_path, pki, tls + "    relay_client_cert_names: [mail.protection.outlook.com]\n")
    assert result.returncode == 0 and ": ok:" in result.stdout
    assert result.stderr.startswith("warning: smtpgate.yaml:")
    assert ("relay_client_cert_names: mail.protection.outlook.com is the certificate of every Microsoft 365 "
            "tenant") in result.stderr
    guarded = check_config(tmp_path, pki, tls + "    relay_client_cert_names: [mail.protection.outlook.com]\n"
                           f"    required_headers:\n      X-MS-Exchange-CrossTenant-Id: [{TENANT}]\n")
    assert guarded.returncode == 0 and guarded.stderr == ""


def test_explain_says_when_a_stamp_exempts_a_message(tmp_path):
    import json
    import subprocess
    import sys

    config = gate_config(tmp_path, "maildir:outbox").path
    subprocess.run([sys.executable, "-m", "smtpgate", "db", "upgrade", "-c", str(config)], check=True,
                   capture_output=True, timeout=60)

    def explain(data: bytes, *args: str) -> str:
        (tmp_path / "message.eml").write_bytes(data)
        out = subprocess.run([sys.executable, "-m", "smtpgate", "explain", str(tmp_path / "message.eml"), *args,
                              "-c", str(config)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    good = f"X-Smtpgate-Processed: {make_stamp(SECRET.encode(), '<x@corp.example>')}"
    text = explain(message("<x@corp.example>", good))
    assert "stamp: valid: X-Smtpgate-Processed verifies" in text and "source activity" not in text
    assert json.loads(explain(message("<x@corp.example>", good), "--json"))["exempt"] is True
    copied = explain(message("<y@corp.example>", good))
    assert "stamp: invalid: X-Smtpgate-Processed does not count (the stamp does not verify" in copied
    assert "source activity: 101203-T" in copied


# ------------------------------------------------------------------ certificate names


@pytest.mark.parametrize("pattern, name, matches", [
    ("mail.peer.test", "mail.peer.test", True),
    ("mail.peer.test", "MAIL.Peer.Test", True),
    ("*.relay.test", "a.relay.test", True),
    ("*.relay.test", "a.b.relay.test", False),  # "*." stands for one label only
    ("*.relay.test", "relay.test", False),
    ("*.relay.test", ".relay.test", False),  # an empty label is no label
    ("*.relay.test", "*.relay.test", True),  # a certificate's wildcard matches only the same pattern
    ("a.relay.test", "*.relay.test", False),
    ("mail.peer.test", "other.peer.test", False),
])
def test_certificate_name_patterns(pattern, name, matches):
    from smtpgate.frontends.smtp.peercert import name_matches

    assert name_matches(pattern, name) is matches
