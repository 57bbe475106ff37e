"""The milter front end on the wire: a real smtpgate, a real SQLite store, the milter protocol over loopback.

The client in tests/support/milter.py plays Postfix (milter_protocol = 6):
it offers what Postfix offers, sends each event the filter asked for and
reads the answers. Every story step asserts the exact modification requests.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import struct

import pytest

from smtpgate.config import load_config
from smtpgate.frontends.milter.codec import MAX_PACKET
from smtpgate.mail.stamp import make_stamp
from smtpgate.runtime.gate import Gate, StartupError
from tests.conftest import write_config
from tests.support.configs import TEAMS_A_B
from smtpgate.runtime.supervisor import bind_listener
from tests.frontends.smtp.test_relay import wait_until
from tests.support.milter import (HDR_LEADSPC, NO_BODY, NO_CONNECT, NO_HELO, NO_MAIL, NR_CONN, NR_HDR, NR_HELO,
                                  NR_MAIL, NR_RCPT, MilterClient, packet, strings)
from tests.support.wire import free_port

MILTER_CONFIG = """\
hostname: relay.test.example
listeners:
  - name: milter
    kind: milter
    address: {address}
upstream:
  url: maildir:outbox
""" + TEAMS_A_B + """\
  - address: fr-payroll@corp.example
    team: Team D (France)
    new_links: never
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
  timeout: {store_timeout}
"""

STEP1 = (
    b"From: Team A <uk-payroll+101203-T@corp.example>\r\n"
    b"To: Client Ltd <client@supplier.example>\r\n"
    b"Cc: \"Payroll, Poland\" <pl-payroll@corp.example>,\r\n"
    b"  hr@corp.example (Human Resources)\r\n"
    b"Subject: Invoice 4411\r\n"
    b"Message-ID: <step1.101203@corp.example>\r\n"
    b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
    b"\r\n"
    b"Dear client,\r\nplease find the invoice.\r\n"
)
SENDER = "uk-payroll+101203-T@corp.example"
STEP1_RCPTS = ["client@supplier.example", "pl-payroll@corp.example", "hr@corp.example"]
NEW = re.compile(r"<pl-payroll\+(\d+-T)@corp\.example>")


@pytest.fixture
def milter_config(tmp_path):
    def build(address: str = "127.0.0.1:0", store_timeout: float = 10, extra: str = "", listener: str = ""):
        text = MILTER_CONFIG.format(address=address, store_timeout=store_timeout) + extra
        text = text.replace("upstream:", listener + "upstream:", 1)
        return load_config(write_config(tmp_path, text))
    return build


@pytest.fixture
async def milter(milter_config, start_gate, log_lines):
    gate, port = await start_gate(milter_config())
    return Milter(gate, port, log_lines)


class Milter:
    def __init__(self, gate, port, log_lines):
        self.gate, self.port, self.log_lines = gate, port, log_lines

    async def client(self) -> MilterClient:
        client = await MilterClient.open(self.port)
        await client.negotiate()
        assert await client.connect() == []  # connect and HELO take no reply (NR_CONN, NR_HELO)
        return client

    async def send(self, mail_from: str, rcpts, data: bytes, **kw) -> list[tuple]:
        client = await self.client()
        try:
            return await client.message(mail_from, rcpts, data, **kw)
        finally:
            await client.quit()

    async def step1(self) -> tuple[str, list[tuple]]:
        actions = await self.send(SENDER, STEP1_RCPTS, STEP1)
        [new] = {m.group(1) for a in actions if len(a) > 1 for m in [NEW.fullmatch(str(a[1]))] if m}
        return new, actions

    def events(self, name: str) -> list[dict]:
        return [e for e in self.log_lines() if e["event"] == name]

    async def link(self, source: str, mailbox: str) -> str | None:
        return await self.gate.store.find_link(source, mailbox)


# ----------------------------------------------------------------- negotiation


async def test_negotiation_asks_only_for_what_smtpgate_uses(milter):
    client = await MilterClient.open(milter.port)
    reply = await client.negotiate()
    _, version, actions, steps, macro_lists = reply
    assert version == 6
    # ADDHDRS 0x01, ADDRCPT 0x04, DELRCPT 0x08, CHGHDRS 0x10, ADDRCPT_PAR 0x80, SETSYMLIST 0x100
    assert actions == 0x01 | 0x04 | 0x08 | 0x10 | 0x80 | 0x100
    # No body, no DATA, no unknown commands; no reply for connect, HELO, MAIL, RCPT, header, EOH;
    # header values with their leading space.
    assert steps == (1 << 4) | (1 << 9) | (1 << 8) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15) \
        | (1 << 7) | (1 << 18) | (1 << 20)
    assert macro_lists == (struct.pack("!I", 0) + b"{client_addr}\0" + struct.pack("!I", 1) + b"{tls_version} {cipher}\0"
                           + struct.pack("!I", 2) + b"i {auth_authen}\0" + struct.pack("!I", 5) + b"i\0")
    await client.close()


async def test_the_negotiation_is_logged_with_the_version_both_sides_speak(milter):
    """milter.negotiated (debug): the lower of the MTA's version and smtpgate's 6, and what was agreed."""
    client = await MilterClient.open(milter.port)
    await client.negotiate()
    await client.close()
    older = await MilterClient.open(milter.port)
    await older.negotiate(version=2, actions=0x1F, steps=0x7F)
    await older.close()
    await wait_until(lambda: len(milter.events("milter.negotiated")) == 2)
    negotiated = milter.events("milter.negotiated")
    assert [{k: e[k] for k in ("level", "version", "actions", "steps")} for e in negotiated] == [
        {"level": "debug", "version": 6, "actions": "0x19d", "steps": "0x14f390"},
        {"level": "debug", "version": 2, "actions": "0x1d", "steps": "0x10"}]


async def test_an_older_mta_without_reply_skipping_gets_a_continue_per_event(milter):
    client = await MilterClient.open(milter.port)
    # Protocol 2 as Sendmail 8.13 had it: NO* steps only; no SETSYMLIST, no ADDRCPT_PAR.
    _, version, actions, steps, macros = await client.negotiate(version=2, actions=0x1F, steps=0x7F)
    assert (version, actions, steps, macros) == (2, 0x1D, NO_BODY, b"")
    assert await client.connect() == [("CONTINUE",), ("CONTINUE",)]
    actions = await client.message(SENDER, ["pl-payroll@corp.example"],
                                   b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll@corp.example\r\n"
                                   b"Message-ID: <old@corp.example>\r\n\r\n")
    new = await milter.link("101203-T", "pl-payroll@corp.example")
    assert actions == [
        ("CONTINUE",),  # MAIL
        ("CONTINUE",),  # RCPT
        ("CONTINUE",),  # DATA
        ("CONTINUE",), ("CONTINUE",), ("CONTINUE",),  # three header fields
        ("CONTINUE",),  # end of header
        ("DELRCPT", "<pl-payroll@corp.example>"),
        ("ADDRCPT", f"<pl-payroll+{new}@corp.example>"),
        # Without HDR_LEADSPC the MTA puts the space after the colon itself.
        ("CHGHEADER", 1, "To", f"pl-payroll+{new}@corp.example".encode()),
        ("ACCEPT",),
    ]
    await client.quit()


async def test_an_mta_that_cannot_change_recipients_is_refused(milter):
    client = await MilterClient.open(milter.port)
    await client.send(packet(b"O", struct.pack("!III", 6, 0x01, 0x1FFFFF)))  # ADDHDRS only
    assert await client.read() == ("TEMPFAIL",)
    assert await client.closed()
    [closed] = milter.events("milter.session.closed")
    assert "DELRCPT" in closed["reason"]


# ----------------------------------------------------------------- the story


async def test_step1_new_link(milter):
    new, actions = await milter.step1()
    assert actions == [
        ("DELRCPT", "<pl-payroll@corp.example>"),
        ("ADDRCPT_PAR", f"<pl-payroll+{new}@corp.example>", "ORCPT=rfc822;pl-payroll@corp.example"),
        ("CHGHEADER", 1, "Cc", f' "Payroll, Poland" <pl-payroll+{new}@corp.example>,\n'
                               f'  hr@corp.example (Human Resources)'.encode()),
        ("ACCEPT",),
    ]
    assert await milter.link("101203-T", "pl-payroll@corp.example") == new
    thread = await milter.gate.store.find_thread(["<step1.101203@corp.example>"])
    assert thread is not None and thread.source_reference == "101203-T"
    [event] = milter.events("message.relayed")
    assert event["queue_id"] == "4ABCDE" and event["message_id"] == "<step1.101203@corp.example>"
    assert event["mail_from"] == SENDER and event["source_reference"] == "101203-T"
    assert event["links_created"] == [new] and event["links_reused"] == []
    assert event["recipients"] == [
        {"original": "client@supplier.example", "relayed": "client@supplier.example"},
        {"original": "pl-payroll@corp.example", "relayed": f"pl-payroll+{new}@corp.example"},
        {"original": "hr@corp.example", "relayed": "hr@corp.example"},
    ]
    assert [e["event"] for e in milter.log_lines() if e["event"].startswith("milter.session")] == [
        "milter.session.opened", "milter.session.closed"]


async def test_step2_reuse_keeps_the_clients_dsn_parameters(milter):
    new, _ = await milter.step1()
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll@corp.example\r\nSubject: follow-up\r\n"
            b"Message-ID: <step2@corp.example>\r\n\r\nx\r\n")
    actions = await milter.send(SENDER, [("pl-payroll@corp.example", "NOTIFY=SUCCESS,FAILURE")], data)
    assert actions == [
        ("DELRCPT", "<pl-payroll@corp.example>"),
        ("ADDRCPT_PAR", f"<pl-payroll+{new}@corp.example>",
         "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;pl-payroll@corp.example"),
        ("CHGHEADER", 1, "To", f" pl-payroll+{new}@corp.example".encode()),
        ("ACCEPT",),
    ]
    event = milter.events("message.relayed")[-1]
    assert event["links_created"] == [] and event["links_reused"] == [new]


async def test_step3_subject_source(milter):
    new, _ = await milter.step1()
    data = (b"From: Jane Doe <jane@corp.example>\r\nTo: client@supplier.example\r\n"
            b"Cc: pl-payroll@corp.example\r\nSubject: RE: Invoice 4411 [101203-T]\r\nMessage-ID: <step3@corp.example>\r\n"
            b"\r\nfrom outlook\r\n")
    actions = await milter.send("jane@corp.example", ["client@supplier.example", "pl-payroll@corp.example"], data)
    assert actions == [
        ("DELRCPT", "<pl-payroll@corp.example>"),
        ("ADDRCPT_PAR", f"<pl-payroll+{new}@corp.example>", "ORCPT=rfc822;pl-payroll@corp.example"),
        ("CHGHEADER", 1, "Cc", f" pl-payroll+{new}@corp.example".encode()),
        ("ACCEPT",),
    ]
    assert milter.events("message.relayed")[-1]["source_found_in"] == "subject"


async def test_step4_thread_reply_from_outside(milter):
    new, _ = await milter.step1()
    data = (b"From: Client Ltd <client@supplier.example>\r\nTo: uk-payroll@corp.example\r\n"
            b"Cc: pl-payroll@corp.example\r\nSubject: Re: Invoice 4411\r\n"
            b"In-Reply-To: <step1.101203@corp.example>\r\nMessage-ID: <step4@supplier.example>\r\n\r\nthanks\r\n")
    actions = await milter.send("client@supplier.example", ["uk-payroll@corp.example", "pl-payroll@corp.example"],
                                data)
    assert actions == [
        ("DELRCPT", "<uk-payroll@corp.example>"),
        ("DELRCPT", "<pl-payroll@corp.example>"),
        ("ADDRCPT_PAR", "<uk-payroll+101203-T@corp.example>", "ORCPT=rfc822;uk-payroll@corp.example"),
        ("ADDRCPT_PAR", f"<pl-payroll+{new}@corp.example>", "ORCPT=rfc822;pl-payroll@corp.example"),
        ("CHGHEADER", 1, "To", b" uk-payroll+101203-T@corp.example"),
        ("CHGHEADER", 1, "Cc", f" pl-payroll+{new}@corp.example".encode()),
        ("ACCEPT",),
    ]
    event = milter.events("message.relayed")[-1]
    assert event["source_found_in"] == "thread" and event["links_created"] == []


async def test_step5_explicit_tag_kept_and_linked(milter):
    await milter.step1()
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll+5512-C@corp.example\r\n"
            b"Message-ID: <step5@corp.example>\r\n\r\nx\r\n")
    actions = await milter.send(SENDER, ["pl-payroll+5512-C@corp.example"], data)
    assert actions == [("ACCEPT",)]
    linked = {row.reference for row in (await milter.gate.store.show("101203-T")).links}
    assert "5512-C" in linked
    assert milter.events("message.relayed")[-1]["links_created"] == ["5512-C"]


async def test_bcc_mailbox_tagged_in_the_envelope_only(milter):
    new, _ = await milter.step1()
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: client@supplier.example\r\n"
            b"Message-ID: <bcc@corp.example>\r\n\r\nx\r\n")
    actions = await milter.send(SENDER, ["client@supplier.example", "pl-payroll@corp.example"], data)
    assert actions == [
        ("DELRCPT", "<pl-payroll@corp.example>"),
        ("ADDRCPT_PAR", f"<pl-payroll+{new}@corp.example>", "ORCPT=rfc822;pl-payroll@corp.example"),
        ("ACCEPT",),
    ]


async def test_no_source_no_changes(milter):
    data = (b"From: Jane <jane@corp.example>\r\nTo: pl-payroll@corp.example, client@supplier.example\r\n"
            b"Subject: no reference here\r\nMessage-ID: <plain@corp.example>\r\n\r\nplain\r\n")
    actions = await milter.send("jane@corp.example", ["pl-payroll@corp.example", "client@supplier.example"], data)
    assert actions == [("ACCEPT",)]
    event = milter.events("message.relayed")[-1]
    assert event["source_reference"] is None and event["links_created"] == []
    assert await milter.gate.store.find_thread(["<plain@corp.example>"]) is None


async def test_a_missing_message_id_is_added(milter):
    data = b"From: uk-payroll+101203-T@corp.example\r\nTo: client@supplier.example\r\nSubject: s\r\n\r\nx\r\n"
    actions = await milter.send(SENDER, ["client@supplier.example"], data)
    assert len(actions) == 2 and actions[1] == ("ACCEPT",)
    name, field, value = actions[0]
    assert (name, field) == ("ADDHEADER", "Message-ID")
    assert re.fullmatch(rb" <[0-9a-f]+@relay\.test\.example>", value), value
    event = milter.events("message.relayed")[-1]
    assert event["message_id"] == value.decode().strip()


# ----------------------------------------------------------------- what the MTA lets smtpgate do

STAMP_SECRET = "0123456789abcdef0123456789abcdef"
NO_MSGID = b"From: uk-payroll+101203-T@corp.example\r\nTo: client@supplier.example\r\n\r\nx\r\n"


async def test_an_mta_without_addrcpt_par_gets_the_recipient_without_parameters(milter):
    new, _ = await milter.step1()
    client = await MilterClient.open(milter.port)
    await client.negotiate(actions=0x1FF & ~0x80)  # ADDRCPT only
    await client.connect()
    actions = await client.message(SENDER, [("pl-payroll@corp.example", "NOTIFY=NEVER")],
                                   b"From: uk-payroll+101203-T@corp.example\r\nMessage-ID: <np@x>\r\n\r\n")
    await client.quit()
    assert actions == [("DELRCPT", "<pl-payroll@corp.example>"), ("ADDRCPT", f"<pl-payroll+{new}@corp.example>"),
                       ("ACCEPT",)]


async def test_an_mta_with_addrcpt_par_only_gets_parameters_even_for_a_shared_recipient(milter_config, start_gate,
                                                                                        log_lines):
    gate, port = await start_gate(milter_config(listener=INBOUND_LISTENER,
                                                extra="inbound:\n  share_with_thread: true\n"))
    new, _ = await Milter(gate, port, log_lines).step1()
    client = await MilterClient.open(gate.bound[1][1])
    await client.negotiate(actions=0x1FF & ~0x04)  # ADDRCPT_PAR only
    await client.connect()
    actions = await client.message("client@supplier.example", ["uk-payroll+101203-T@corp.example"],
                                   b"From: client@supplier.example\r\nTo: uk-payroll+101203-T@corp.example\r\n"
                                   b"In-Reply-To: <step1.101203@corp.example>\r\n"
                                   b"Message-ID: <par@supplier.example>\r\n\r\n")
    await client.quit()
    # The shared recipient has no ESMTP parameters of its own: ADDRCPT_PAR with none.
    assert actions == [("CONTINUE",), ("ADDRCPT_PAR", f"<pl-payroll+{new}@corp.example>", ""), ("ACCEPT",)]
    # Offered both, the plain ADDRCPT.
    client = await MilterClient.open(gate.bound[1][1])
    await client.negotiate()
    await client.connect()
    both = await client.message("client@supplier.example", ["uk-payroll+101203-T@corp.example"],
                                b"From: client@supplier.example\r\nTo: uk-payroll+101203-T@corp.example\r\n"
                                b"In-Reply-To: <step1.101203@corp.example>\r\n"
                                b"Message-ID: <both@supplier.example>\r\n\r\n")
    await client.quit()
    assert both == [("CONTINUE",), ("ADDRCPT", f"<pl-payroll+{new}@corp.example>"), ("ACCEPT",)]


async def test_an_mta_that_cannot_add_header_fields_gets_no_message_id(milter_config, start_gate, log_lines,
                                                                     tmp_path):
    (tmp_path / "stamp.key").write_text(STAMP_SECRET + "\n")
    gate, port = await start_gate(milter_config(extra="stamp:\n  secret_file: stamp.key\n"))
    client = await MilterClient.open(port)
    await client.negotiate(actions=0x1FF & ~0x01)  # no ADDHDRS
    await client.connect()
    actions = await client.message(SENDER, ["client@supplier.example"], NO_MSGID)
    await client.quit()
    assert actions == [("ACCEPT",)]


async def test_the_stamp_is_added_and_one_that_does_not_verify_is_taken_out(milter_config, start_gate, log_lines,
                                                                           tmp_path):
    (tmp_path / "stamp.key").write_text(STAMP_SECRET + "\n")
    gate, port = await start_gate(milter_config(extra="stamp:\n  header: X-Gate-Done\n  secret_file: stamp.key\n"))
    m = Milter(gate, port, log_lines)
    stamp = make_stamp(STAMP_SECRET.encode(), "<st@corp.example>")
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: client@supplier.example\r\n"
            b"X-Gate-Done: v1:" + b"A" * 43 + b"\r\nMessage-ID: <st@corp.example>\r\n\r\nx\r\n")
    actions = await m.send(SENDER, ["client@supplier.example"], data)
    assert actions == [("CHGHEADER", 1, "X-Gate-Done", b""), ("ADDHEADER", "X-Gate-Done", f" {stamp}".encode()),
                       ("ACCEPT",)]
    # An MTA without HDR_LEADSPC puts the space after the colon itself.
    client = await MilterClient.open(port)
    await client.negotiate(version=2, actions=0x1F, steps=0x7F)
    await client.connect()
    old = await client.message(SENDER, ["client@supplier.example"], data)
    await client.quit()
    assert [a for a in old if a[0] != "CONTINUE"] == [
        ("CHGHEADER", 1, "X-Gate-Done", b""), ("ADDHEADER", "X-Gate-Done", stamp.encode()), ("ACCEPT",)]
    # Stamped as smtpgate stamps it: passed untouched, each recipient logged as it is.
    stamped = data.replace(b"v1:" + b"A" * 43, stamp.encode())
    assert await m.send(SENDER, ['"client"@supplier.example'], stamped) == [("ACCEPT",)]
    [processed] = m.events("message.already_processed")
    assert processed["message_id"] == "<st@corp.example>" and processed["mail_from"] == SENDER
    relayed = m.events("message.relayed")[-1]
    assert relayed["already_processed"] is True
    assert relayed["recipients"] == [{"original": "client@supplier.example", "relayed": "client@supplier.example"}]


async def test_two_spellings_of_one_mailbox_are_sent_once(milter):
    new, _ = await milter.step1()
    data = b"From: uk-payroll+101203-T@corp.example\r\nTo: client@supplier.example\r\nMessage-ID: <2s@x>\r\n\r\n"
    actions = await milter.send(SENDER, ["pl-payroll@corp.example", "PL-Payroll@Corp.Example"], data)
    assert actions == [
        ("DELRCPT", "<pl-payroll@corp.example>"),
        ("DELRCPT", "<PL-Payroll@Corp.Example>"),
        ("ADDRCPT_PAR", f"<pl-payroll+{new}@corp.example>", "ORCPT=rfc822;pl-payroll@corp.example"),
        ("ACCEPT",),
    ]
    # The second spelling goes out as the first: relayed as nothing of its own.
    assert milter.events("message.relayed")[-1]["recipients"] == [
        {"original": "pl-payroll@corp.example", "relayed": f"pl-payroll+{new}@corp.example"},
        {"original": "PL-Payroll@Corp.Example", "relayed": None}]


async def test_several_messages_on_one_connection(milter):
    client = await milter.client()
    first = await client.message(SENDER, ["pl-payroll@corp.example"],
                                 b"From: uk-payroll+101203-T@corp.example\r\nMessage-ID: <1@x>\r\n\r\n")
    await client.abort()  # Postfix resets the filter after every message
    second = await client.message(SENDER, ["pl-payroll@corp.example"],
                                  b"From: uk-payroll+101203-T@corp.example\r\nMessage-ID: <2@x>\r\n\r\n",
                                  queue_id="5FGHIJ")
    await client.quit()
    assert first == second and first[-1] == ("ACCEPT",)
    assert [e["queue_id"] for e in milter.events("message.relayed")] == ["4ABCDE", "5FGHIJ"]
    [closed] = milter.events("milter.session.closed")
    assert closed["messages"] == 2 and closed["reason"] == "quit"


async def test_client_macros_reach_the_envelope(milter, milter_config):
    """What Postfix's macros say of the client is what the decision and its events see:
    the address, HELO, the login and the TLS of the connection, and the envelope sender."""
    client = await MilterClient.open(milter.port)
    await client.negotiate()
    await client.connect(client_addr="198.51.100.9", helo="laptop.corp.example",
                         tls=("TLSv1.3", "TLS_AES_256_GCM_SHA384"))
    await client.message(SENDER, ["client@supplier.example"],
                         b"From: uk-payroll+101203-T@corp.example\r\nMessage-ID: <m@x>\r\n\r\n", auth="alice")
    await client.quit()
    event = milter.events("message.relayed")[-1]
    assert (event["client_ip"], event["helo"], event["sasl_username"]) == (
        "198.51.100.9", "laptop.corp.example", "alice")
    assert event["tls"] == "TLSv1.3 TLS_AES_256_GCM_SHA384"
    assert event["mail_from"] == SENDER and event["source_reference"] == "101203-T"
    assert milter.events("milter.session.closed")[-1]["client_ip"] == "198.51.100.9"


async def test_without_the_client_addr_macro_the_connect_address_names_the_client(milter):
    """An MTA that sends no {client_addr} macro: CONNECT's own address is the client's for an
    IPv4 or IPv6 client; a local (unix socket) client has none."""
    for family, address in ((b"4", "192.0.2.33"), (b"6", "2001:db8::7"), (b"L", "/var/run/local.sock")):
        client = await MilterClient.open(milter.port)
        await client.negotiate()
        assert await client.event(b"C", strings("client.test") + family + struct.pack("!H", 40000) + strings(address),
                                  skip=NO_CONNECT, no_reply=NR_CONN) == []
        assert await client.event(b"H", strings("client.test"), skip=NO_HELO, no_reply=NR_HELO) == []
        actions = await client.message("jane@corp.example", ["client@supplier.example"],
                                       b"From: jane@corp.example\r\nMessage-ID: <addr@x>\r\n\r\n")
        await client.quit()
        assert actions == [("ACCEPT",)]
    assert [e["client_ip"] for e in milter.events("message.relayed")] == ["192.0.2.33", "2001:db8::7", "?"]
    await wait_until(lambda: len(milter.events("milter.session.closed")) == 3)
    assert [e["client_ip"] for e in milter.events("milter.session.closed")] == ["192.0.2.33", "2001:db8::7", "?"]


# ----------------------------------------------------------------- failures


async def test_store_unavailable_is_a_temporary_failure(milter_config, start_gate, log_lines, tmp_path):
    gate, port = await start_gate(milter_config(store_timeout=1))
    m = Milter(gate, port, log_lines)
    data = (b"From: uk-payroll+77-C@corp.example\r\nTo: pl-payroll@corp.example\r\n"
            b"Message-ID: <retry@corp.example>\r\n\r\nx\r\n")
    # Another writer holds the store's write lock (taken once the start-up prune is done with it).
    blocker = sqlite3.connect(tmp_path / "smtpgate.db", timeout=10, check_same_thread=False)
    await asyncio.to_thread(blocker.execute, "BEGIN IMMEDIATE")
    try:
        actions = await m.send("uk-payroll+77-C@corp.example", ["pl-payroll@corp.example"], data)
    finally:
        blocker.rollback()
        blocker.close()
    assert actions == [("REPLYCODE", "451 4.3.0 Temporary failure, try again later")]
    assert await m.link("77-C", "pl-payroll@corp.example") is None
    [rejected] = m.events("message.rejected")
    assert rejected["code"] == 451 and "store" in rejected["reason"] and rejected["queue_id"] == "4ABCDE"
    # The MTA retries with the store back: linked now.
    actions = await m.send("uk-payroll+77-C@corp.example", ["pl-payroll@corp.example"], data)
    assert actions[-1] == ("ACCEPT",) and await m.link("77-C", "pl-payroll@corp.example") is not None


async def test_too_many_hops_is_refused(milter):
    data = b"".join(b"Received: from x by y; Fri, 27 Nov 2026 10:00:00 +0000\r\n" for _ in range(51))
    data += b"From: uk-payroll+101203-T@corp.example\r\n\r\n"
    actions = await milter.send(SENDER, ["pl-payroll@corp.example"], data)
    assert actions == [("REPLYCODE", "554 5.4.6 Too many hops, mail loop suspected")]
    assert await milter.link("101203-T", "pl-payroll@corp.example") is None
    [rejected] = milter.events("message.rejected")
    assert {k: rejected.get(k) for k in ("level", "code", "reason", "queue_id", "mail_from", "client_ip", "helo")} == {
        "level": "info", "code": 554, "reason": "51 Received fields", "queue_id": "4ABCDE", "mail_from": SENDER,
        "client_ip": "192.0.2.7", "helo": "client.test"}
    assert "exception" not in rejected


async def still_serving(milter) -> None:
    """A full message on a new connection goes through: the listener survived."""
    actions = await milter.send("jane@corp.example", ["client@supplier.example"],
                                b"From: jane@corp.example\r\nMessage-ID: <ok@corp.example>\r\n\r\n")
    assert actions == [("ACCEPT",)]


def closed_reason(milter) -> str:
    return milter.events("milter.session.closed")[0]["reason"]


async def closed_session(milter, timeout: float = 10) -> dict:
    """The first milter.session.closed event, once the server has written it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not milter.events("milter.session.closed"):
        assert asyncio.get_running_loop().time() < deadline, "no milter.session.closed logged"
        await asyncio.sleep(0.01)
    return milter.events("milter.session.closed")[0]


async def test_violation_out_of_order(milter):
    """Every order the session refuses: tests/frontends/milter/test_milter_session.py."""
    client = await MilterClient.open(milter.port)
    await client.negotiate()
    await client.connect()
    await client.send(packet(b"R", strings("<pl-payroll@corp.example>")))  # RCPT before MAIL
    assert await client.read() == ("TEMPFAIL",)
    assert await client.closed()
    assert "RCPT outside a message" in closed_reason(milter)
    await still_serving(milter)


async def test_violation_oversize_packet(milter):
    client = await MilterClient.open(milter.port)
    await client.negotiate()
    await client.connect()
    await client.send(struct.pack("!I", MAX_PACKET + 1) + b"L")  # refused on its length alone
    assert await client.read() == ("TEMPFAIL",)
    assert await client.closed()
    assert "over the limit" in closed_reason(milter)
    await still_serving(milter)


async def test_violation_truncated_packet(milter):
    client = await MilterClient.open(milter.port)
    await client.negotiate()
    await client.send(struct.pack("!I", 40) + b"C" + b"client.test\0")  # 13 of 40 octets, then EOF
    client.writer.write_eof()
    assert await client.read() == ("TEMPFAIL",)
    assert await client.closed()
    assert "inside a packet" in closed_reason(milter)
    await still_serving(milter)


async def test_violation_garbage(milter):
    client = await MilterClient.open(milter.port)
    await client.send(b"\x00\x00\x00\x05HELLO")
    assert await client.read() == ("TEMPFAIL",)
    assert await client.closed()
    assert "HELO" in closed_reason(milter) or "unknown command" in closed_reason(milter)
    await still_serving(milter)


async def test_connection_dropped_mid_message(milter):
    client = await MilterClient.open(milter.port)
    await client.negotiate()
    await client.connect()
    await client.send(packet(b"M", strings(f"<{SENDER}>")) + packet(b"R", strings("<pl-payroll@corp.example>"))
                      + packet(b"L", strings("From", f" {SENDER}")))
    await client.close()
    dropped = await closed_session(milter)
    assert dropped["reason"] == "closed by the MTA (in the middle of a message)" and dropped["messages"] == 0
    assert await milter.link("101203-T", "pl-payroll@corp.example") is None
    assert milter.events("message.relayed") == []
    await still_serving(milter)


async def test_unix_socket_listener(milter_config, start_gate, log_lines, tmp_path):
    path = tmp_path / "milter.sock"
    path.touch()  # a stale file that is not a socket is refused, not removed
    refused = Gate(milter_config(address=str(path)))
    with pytest.raises(StartupError, match="not a socket"):
        await refused.start()
    await refused.drain(0)
    assert path.is_file()
    path.unlink()
    gate, _ = await start_gate(milter_config(address=str(path)))
    assert gate.bound == [(str(path), 0)]
    assert oct(path.stat().st_mode & 0o777) == "0o660"
    client = await MilterClient.open(path=str(path))
    await client.negotiate()
    await client.connect()
    actions = await client.message(SENDER, ["client@supplier.example"],
                                   b"From: uk-payroll+101203-T@corp.example\r\nMessage-ID: <u@x>\r\n\r\n")
    assert actions == [("ACCEPT",)]
    await client.quit()
    # An MTA on the unix socket has no address of its own: the peer is named "unix".
    [opened] = [e for e in log_lines() if e["event"] == "milter.session.opened"]
    assert opened["peer"] == "unix" and opened["listener"] == "milter"


async def test_observe_mode_changes_nothing(milter_config, start_gate, log_lines):
    gate, port = await start_gate(milter_config(extra="mode: observe\n"))
    m = Milter(gate, port, log_lines)
    actions = await m.send(SENDER, STEP1_RCPTS, STEP1)
    assert actions == [("ACCEPT",)]
    assert await m.link("101203-T", "pl-payroll@corp.example") is None
    [observed] = m.events("message.observed")
    assert observed["links_would_create"] == ["pl-payroll@corp.example"]


def test_reply_steps_named_in_the_client_match_the_protocol():
    # The client's constants are the protocol's, so a test cannot pass on a shared mistake.
    assert (NR_HDR, NR_RCPT, HDR_LEADSPC, NO_BODY) == (0x80, 0x8000, 0x100000, 0x10)


async def test_quit_new_connection_starts_over_on_the_same_socket(milter):
    client = await milter.client()
    await client.send(packet(b"K"))
    assert await client.connect() == []
    actions = await client.message("jane@corp.example", ["client@supplier.example"],
                                   b"From: jane@corp.example\r\nMessage-ID: <k@x>\r\n\r\n")
    assert actions == [("ACCEPT",)]
    await client.quit()


async def test_body_sent_anyway_is_ignored(milter):
    client = await MilterClient.open(milter.port)
    await client.negotiate(steps=0)  # the MTA offers no step: every event comes, every event is answered
    assert await client.connect() == [("CONTINUE",), ("CONTINUE",)]
    actions = await client.message("jane@corp.example", ["client@supplier.example"],
                                   b"From: jane@corp.example\r\nMessage-ID: <b@x>\r\n\r\nthe body\r\n")
    assert actions == [("CONTINUE",)] * 7 + [("ACCEPT",)]  # MAIL RCPT DATA 2 fields EOH BODY, then EOM
    assert await client.event(b"U", strings("XYZZY")) == [("CONTINUE",)]  # an unknown SMTP command
    await client.quit()


async def test_recipients_smtpgate_cannot_parse_are_left_alone_and_orcpt_is_kept(milter):
    new, _ = await milter.step1()
    data = b"From: uk-payroll+101203-T@corp.example\r\nMessage-ID: <p@x>\r\n\r\n"
    actions = await milter.send(SENDER, ["a..b@corp.example",
                                         ("pl-payroll@corp.example", "ORCPT=rfc822;Payroll@corp.example",
                                          "X-OTHER=1")], data)
    assert actions == [
        ("DELRCPT", "<pl-payroll@corp.example>"),
        ("ADDRCPT_PAR", f"<pl-payroll+{new}@corp.example>", "ORCPT=rfc822;Payroll@corp.example"),
        ("ACCEPT",),
    ]
    assert milter.events("message.relayed")[-1]["recipients"][0] == {
        "original": "a..b@corp.example", "relayed": "a..b@corp.example"}


async def test_a_header_over_the_message_size_limit_is_refused(milter_config, start_gate, log_lines):
    gate, port = await start_gate(milter_config(extra="limits:\n  max_message_size: 100\n"))
    m = Milter(gate, port, log_lines)
    data = b"From: uk-payroll+101203-T@corp.example\r\nSubject: " + b"x" * 100 + b"\r\n\r\n"
    actions = await m.send(SENDER, ["pl-payroll@corp.example"], data)
    assert actions == [("REPLYCODE", "552 5.3.4 Message size exceeds fixed maximum message size")]
    assert await m.link("101203-T", "pl-payroll@corp.example") is None


async def test_a_header_of_exactly_the_message_size_limit_is_taken_whole(milter_config, start_gate, log_lines):
    gate, port = await start_gate(milter_config(extra="limits:\n  max_message_size: 100\n"))
    m = Milter(gate, port, log_lines)
    message_id = "<edge" + "x" * 27 + "@corp.example>"
    data = f"From: uk-payroll+101203-T@corp.example\r\nMessage-ID: {message_id}\r\n\r\n".encode()
    assert len(data) - 2 == 100  # the two fields, each with its CRLF; the empty line ends the header
    actions = await m.send(SENDER, ["client@supplier.example"], data)
    # Accepted, and its last field read: the message keeps its own Message-ID.
    assert actions == [("ACCEPT",)]
    [relayed] = m.events("message.relayed")
    assert relayed["message_id"] == message_id


async def test_a_socket_left_by_an_earlier_run_is_replaced(milter_config, start_gate, log_lines, tmp_path):
    import socket

    path = tmp_path / "milter.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    gate, _ = await start_gate(milter_config(address=str(path)))
    client = await MilterClient.open(path=str(path))
    await client.negotiate()
    await client.close()


async def test_a_listener_on_a_fixed_port_listens_on_that_port_and_says_so(milter_config, start_gate, log_lines):
    port = free_port()
    gate, bound = await start_gate(milter_config(address=f"127.0.0.1:{port}"))
    assert gate.bound == [("127.0.0.1", port)] and bound == port
    m = Milter(gate, port, log_lines)
    assert await m.send("jane@corp.example", ["client@supplier.example"],
                        b"From: jane@corp.example\r\nMessage-ID: <fixed@x>\r\n\r\n") == [("ACCEPT",)]
    [started] = m.events("listener.started")
    assert {k: v for k, v in started.items() if k not in ("timestamp", "host", "version")} == {
        "event": "listener.started", "level": "info", "listener": "milter", "kind": "milter",
        "address": f"127.0.0.1:{port}", "mode": "enforce"}


async def test_a_listening_socket_bound_before_start_is_served(milter_config, log_lines):
    """The worker supervisor binds the listeners' sockets and hands them to each Gate."""
    config = milter_config()
    [listener] = config.listeners
    sockets = bind_listener(listener)
    port = sockets[0].getsockname()[1]
    gate = Gate(config)
    await gate.start([(listener, sockets)])
    try:
        assert gate.bound == [("127.0.0.1", port)]
        m = Milter(gate, port, log_lines)
        actions = await m.send("jane@corp.example", ["client@supplier.example"],
                               b"From: jane@corp.example\r\nMessage-ID: <inherited@x>\r\n\r\n")
        assert actions == [("ACCEPT",)]
    finally:
        await gate.drain(0)
    [relayed] = m.events("message.relayed")
    assert relayed["message_id"] == "<inherited@x>" and relayed["listener"] == "milter"


async def test_connections_over_the_limit_are_closed(milter_config, start_gate, log_lines):
    gate, port = await start_gate(milter_config(extra="limits:\n  max_connections: 1\n"))
    m = Milter(gate, port, log_lines)
    first = await m.client()
    second = await MilterClient.open(port)
    assert await second.closed()  # Postfix then applies milter_default_action (tempfail)
    [refused] = m.events("milter.session.refused")
    assert (refused["reason"], refused["listener"]) == ("limits.max_connections reached", "milter")
    actions = await first.message("jane@corp.example", ["client@supplier.example"],
                                  b"From: jane@corp.example\r\nMessage-ID: <l@x>\r\n\r\n")
    assert actions == [("ACCEPT",)]
    await first.quit()
    # The finished connection no longer counts: the next one is served.
    await wait_until(lambda: not gate.registry.sessions)
    assert await m.send("jane@corp.example", ["client@supplier.example"],
                        b"From: jane@corp.example\r\nMessage-ID: <l2@x>\r\n\r\n") == [("ACCEPT",)]
    assert len(m.events("milter.session.refused")) == 1


async def test_a_drain_waits_for_no_one_after_its_grace_and_closes_a_message_in_flight(milter_config, log_lines):
    gate = Gate(milter_config())
    await gate.start()
    try:
        client = await MilterClient.open(gate.bound[0][1])
        await client.negotiate()
        await client.connect()
        await client.send(packet(b"M", strings(f"<{SENDER}>")))  # no reply due: wait for the session to be busy
        deadline = asyncio.get_running_loop().time() + 10
        while not gate.registry.busy:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
    finally:
        await gate.drain(0)
    # Postfix applies milter_default_action (tempfail) to the message; nothing was decided.
    assert await client.closed()
    [closed] = [e for e in log_lines() if e["event"] == "milter.session.closed"]
    assert closed["reason"] == "shutting down (in the middle of a message)"



INBOUND_LISTENER = """\
  - name: inbound
    kind: milter
    address: 127.0.0.1:0
    direction: inbound
"""


async def test_inbound_milter_restores_the_tags_a_reply_dropped(milter_config, start_gate, log_lines):
    gate, port = await start_gate(milter_config(listener=INBOUND_LISTENER))
    outbound = Milter(gate, port, log_lines)
    new, _ = await outbound.step1()
    inbound = Milter(gate, gate.bound[1][1], log_lines)
    reply = (b"From: Client Ltd <client@supplier.example>\r\n"
             b"To: uk-payroll@corp.example, pl-payroll@corp.example\r\nSubject: Re: Invoice 4411\r\n"
             b"In-Reply-To: <step1.101203@corp.example>\r\nMessage-ID: <reply@supplier.example>\r\n\r\nthanks\r\n")
    client = await inbound.client()
    # RCPT is answered on an inbound listener: another domain is refused there.
    actions = await client.message("client@supplier.example",
                                   ["uk-payroll@corp.example", "pl-payroll@corp.example", "someone@else.example"],
                                   reply)
    await client.quit()
    assert actions == [
        ("CONTINUE",), ("CONTINUE",),
        ("REPLYCODE", "554 5.7.1 Relay access denied"),
        ("DELRCPT", "<uk-payroll@corp.example>"),
        ("DELRCPT", "<pl-payroll@corp.example>"),
        ("ADDRCPT_PAR", "<uk-payroll+101203-T@corp.example>", "ORCPT=rfc822;uk-payroll@corp.example"),
        ("ADDRCPT_PAR", f"<pl-payroll+{new}@corp.example>", "ORCPT=rfc822;pl-payroll@corp.example"),
        ("ACCEPT",),  # no CHGHEADER: the headers the external party wrote stay as they are
    ]
    [retagged] = outbound.events("message.retagged")
    assert retagged["recipients"] == [
        {"original": "uk-payroll@corp.example", "relayed": "uk-payroll+101203-T@corp.example",
         "thread_message_id": "<step1.101203@corp.example>"},
        {"original": "pl-payroll@corp.example", "relayed": f"pl-payroll+{new}@corp.example",
         "thread_message_id": "<step1.101203@corp.example>"}]
    # Inbound mail creates no link and no thread record.
    assert [link.reference for link in (await gate.store.show("101203-T")).links] == [new]
    assert await gate.store.find_thread(["<reply@supplier.example>"]) is None
    [refused] = [e for e in outbound.events("command.refused") if e.get("recipient")]
    assert {k: refused[k] for k in ("code", "reason", "stage", "recipient", "listener")} == {
        "code": 554, "reason": "inbound listener: not an internal domain", "stage": "rcpt",
        "recipient": "someone@else.example", "listener": "inbound"}


async def test_inbound_milter_strips_a_guessed_tag_when_told_to(milter_config, start_gate, log_lines):
    gate, _ = await start_gate(milter_config(listener=INBOUND_LISTENER, extra="inbound:\n  unknown_tags: strip\n"))
    inbound = Milter(gate, gate.bound[1][1], log_lines)
    data = (b"From: someone@outside.example\r\nTo: pl-payroll+424242-T@corp.example\r\n"
            b"Message-ID: <guess@outside.example>\r\n\r\nguessing\r\n")
    actions = await inbound.send("someone@outside.example", ["pl-payroll+424242-T@corp.example"], data)
    assert actions == [
        ("CONTINUE",),
        ("DELRCPT", "<pl-payroll+424242-T@corp.example>"),
        ("ADDRCPT_PAR", "<pl-payroll@corp.example>", "ORCPT=rfc822;pl-payroll+2B424242-T@corp.example"),
        ("ACCEPT",),
    ]
    [unknown] = inbound.events("inbound.unknown_tag")
    assert unknown["tag"] == "424242-T" and unknown["action"] == "strip"



def _sample(exposition: str, name: str) -> float:
    """One unlabelled sample of the Prometheus text exposition (0 when it has not been written)."""
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def test_a_milter_listener_beside_the_admin_server_through_a_reload_and_a_drain(
        milter_config, log_lines, tmp_path):
    """The admin server counts and shows milter messages; a reload reaches MTA connections opened
    after it; a drain answers /readyz 503 at once and still lets the message in flight finish."""
    import aiohttp

    from tests.support.admin import ADMIN_YAML, write_tokens

    tokens = write_tokens(tmp_path)
    gate = Gate(milter_config(extra=ADMIN_YAML))
    await gate.start()
    m = Milter(gate, gate.bound[0][1], log_lines)
    host, admin_port = gate.admin.bound[0]
    draining = None
    try:
        async with aiohttp.ClientSession() as http:
            async def get(path: str, token: str | None = None) -> tuple[int, str]:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                async with http.get(f"http://{host}:{admin_port}{path}", headers=headers) as response:
                    return response.status, await response.text()

            status, text = await get("/readyz")
            assert status == 200, text
            before = _sample((await get("/metrics"))[1], "smtpgate_messages_relayed_total")
            new, _ = await m.step1()
            assert _sample((await get("/metrics"))[1], "smtpgate_messages_relayed_total") == before + 1
            status, text = await get("/api/v1/activities/101203-T", tokens["admin"])
            assert status == 200 and new in text

            # fr-payroll takes no new links; the reloaded config lets it, for connections opened since.
            earlier = await m.client()
            gate.reload(load_config(write_config(tmp_path, MILTER_CONFIG.format(
                address="127.0.0.1:0", store_timeout=10).replace("    new_links: never\n", "") + ADMIN_YAML)))
            data = (b"From: uk-payroll+101203-T@corp.example\r\nCc: fr-payroll@corp.example\r\n"
                    b"Message-ID: <reload@corp.example>\r\n\r\nbody\r\n")
            kept = await earlier.message(SENDER, ["fr-payroll@corp.example"], data)
            await earlier.quit()
            assert kept == [("ACCEPT",)]  # the snapshot this connection started with
            later = await m.send(SENDER, ["fr-payroll@corp.example"], data.replace(b"<reload@", b"<reload2@"))
            assert any(a[0] == "ADDRCPT_PAR" and a[1].startswith("<fr-payroll+") for a in later), later
            assert (await get("/readyz"))[0] == 200

            busy = await m.client()
            await busy.event(b"M", strings(f"<{SENDER}>"), skip=NO_MAIL, no_reply=NR_MAIL, macros=[("i", "4DRAIN")])
            async with asyncio.timeout(10):
                while not gate.registry.busy:
                    await asyncio.sleep(0.01)
            draining = asyncio.create_task(gate.drain(10))
            async with asyncio.timeout(10):
                while not gate.registry.draining:  # the drain task sets it on its first step
                    await asyncio.sleep(0)
            status, text = await get("/readyz")
            assert status == 503 and "shutting down" in text
            tail = await busy.rest(["client@supplier.example"], b"From: uk-payroll+101203-T@corp.example\r\n"
                                   b"Message-ID: <drain@corp.example>\r\n\r\nbody\r\n", queue_id="4DRAIN")
            assert tail[-1] == ("ACCEPT",)
            await draining
            assert await busy.closed()
    finally:
        if draining is None:
            await gate.drain(0)
    [relayed] = [e for e in m.events("message.relayed") if e["message_id"] == "<drain@corp.example>"]
    assert relayed["queue_id"] == "4DRAIN" and relayed["client_ip"] == "192.0.2.7"
