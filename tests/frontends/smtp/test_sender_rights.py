"""Sender rights for auth_backend: file: a user's sender list, enforced at MAIL and at the end of DATA.

The lists themselves (what an entry matches, the file, `users add`): tests/test_users.py.
"""

from __future__ import annotations

import pytest

from smtpgate.config import load_config
from smtpgate.users import add_user
from tests.conftest import write_config
from tests.support.sink import client_tls_context, make_test_cert
from tests.support.smtp import send

JANE = ("jane", "jane's pass")
BOB = ("bob", "bob's pass")


def message(from_: str) -> bytes:
    return f"From: Someone <{from_}>\r\nTo: b@x.example\r\nSubject: rights\r\n\r\nbody\r\n".encode()


@pytest.fixture
async def gate_with_users(tmp_path, sink, start_gate, log_lines):
    cert, key = make_test_cert(tmp_path / "tls")
    users = tmp_path / "users"
    add_user(users, *JANE, senders=["jane@corp.example", "uk-payroll+*@corp.example"])
    add_user(users, *BOB)
    config = load_config(write_config(tmp_path, f"""\
listeners:
  - name: submission
    address: 127.0.0.1:0
    tls: starttls
    tls_cert: {cert}
    tls_key: {key}
    auth: optional
    relay_networks: [127.0.0.1/32]
users_file: users
upstream:
  url: smtp://127.0.0.1:{sink.port}
internal_domains: [corp.example]
mailboxes:
  - address: uk-payroll@corp.example
    team: Team A (UK)
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
"""))
    gate, port = await start_gate(config)
    tls = client_tls_context(cert)

    async def submit(login, mail_from: str, from_: str | None = None, data: bytes | None = None):
        return await send("127.0.0.1", port, mail_from=mail_from, rcpt_tos=["b@x.example"],
                          data=data or message(from_ or mail_from), starttls=True, tls_context=tls, login=login)

    return submit


async def test_allowed_sender_and_tagged_mailbox_relayed(gate_with_users, sink):
    # What a list entry matches (case, tags, domains): tests/test_users.py.
    tagged = await gate_with_users(JANE, "UK-Payroll+101203-T@corp.example")
    assert tagged.data is not None and tagged.data[0] == 250
    assert len(sink.messages) == 1


async def test_envelope_sender_outside_the_list_refused_at_mail(gate_with_users, sink, log_lines):
    refused = await gate_with_users(JANE, "pl-payroll@corp.example")
    assert refused.mail[0] == 550 and refused.mail[1].startswith("5.7.1")
    assert refused.data is None and sink.received == [] and not any(c.startswith("MAIL") for c in sink.commands)
    [event] = [e for e in log_lines() if e["event"] == "message.rejected"]
    assert event["code"] == 550 and event["stage"] == "mail" and event["sasl_username"] == "jane"
    assert event["mail_from"] == "pl-payroll@corp.example"


async def test_from_outside_the_list_refused_at_end_of_data(gate_with_users, sink, log_lines):
    refused = await gate_with_users(JANE, "jane@corp.example", from_="boss@corp.example")
    assert refused.mail[0] == 250
    assert refused.data is not None and refused.data[0] == 550 and refused.data[1].startswith("5.7.1")
    # The upstream had MAIL, RCPT and (every recipient final at RCPT) DATA, but never the dot:
    # that transaction was given up with its connection.
    assert sink.received == []
    await sink.wait_for(lambda: sink.closed_after_data == 1, what="the upstream transaction given up")
    [event] = [e for e in log_lines() if e["event"] == "message.rejected"]
    assert event["code"] == 550 and event["stage"] == "data" and event["sasl_username"] == "jane"
    assert event["header_from"] == "boss@corp.example"
    # One From: field naming two authors, one of them not hers, is refused too.
    both = await gate_with_users(JANE, "jane@corp.example", from_="jane@corp.example>, <boss@corp.example")
    assert both.data is not None and both.data[0] == 550


async def test_user_without_a_list_and_relay_networks_may_send_as_anyone(gate_with_users, sink):
    anyone = await gate_with_users(BOB, "pl-payroll@corp.example", from_="boss@corp.example")
    assert anyone.data is not None and anyone.data[0] == 250
    # Not authenticated, relaying by relay_networks: no user, no list.
    unauthenticated = await gate_with_users(None, "boss@corp.example")
    assert unauthenticated.data is not None and unauthenticated.data[0] == 250


async def test_every_from_field_is_checked_and_an_unreadable_one_refused(gate_with_users, sink, log_lines):
    second = b"From: jane@corp.example\r\nFrom: boss@corp.example\r\nTo: b@x.example\r\n\r\nbody\r\n"
    refused = await gate_with_users(JANE, "jane@corp.example", data=second)
    assert refused.data is not None and refused.data[0] == 550
    [event] = [e for e in log_lines() if e["event"] == "message.rejected"]
    assert event["header_from"] == "boss@corp.example"
    unreadable = b"From: Someone <jane@corp.example\r\nTo: b@x.example\r\n\r\nbody\r\n"
    refused = await gate_with_users(JANE, "jane@corp.example", data=unreadable)
    assert refused.data is not None and refused.data[0] == 550 and refused.data[1].startswith("5.7.1")
    assert sink.received == []
    # Both fields hers: relayed.
    hers = second.replace(b"boss@", b"uk-payroll+101203-T@")
    assert (await gate_with_users(JANE, "jane@corp.example", data=hers)).data[0] == 250
