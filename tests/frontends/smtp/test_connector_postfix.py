"""The Postfix content-filter hairpin (docs/connectors.md, "Postfix"): a real Postfix with
virtual mailboxes hands every message to smtpgate (`content_filter`) and takes it back on a
reinjection smtpd that has no filter; smtpgate's stamp keeps a message from being processed twice."""

from __future__ import annotations

import asyncio
import socket

import pytest

from smtpgate.config import load_config
from smtpgate.mail.headers import parse_header_block
from smtpgate.mail.stamp import make_stamp, verify_stamp
from tests.conftest import write_config
from tests.support.configs import TEAMS_A_B
from tests.support.postfix import PostfixInstance
from tests.support.smtp import send

pytestmark = pytest.mark.postfix

SECRET = "the-hairpin-stamp-secret-of-this-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reinjection_service(port: int) -> list[str]:
    """The amavis model's return path: an smtpd without the content filter, for loopback only."""
    return [f"127.0.0.1:{port} inet n - n - - smtpd",
            "  -o content_filter=",
            "  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks",
            "  -o mynetworks=127.0.0.0/8",
            "  -o smtpd_relay_restrictions=permit_mynetworks,reject"]


def message(msgid: str, *extra: str) -> bytes:
    fields = ["From: UK Payroll <uk-payroll+101203-T@corp.example>", "To: PL Payroll <pl-payroll@corp.example>",
              "Subject: Payroll run for December", f"Message-ID: {msgid}", *extra]
    return ("\r\n".join(fields) + "\r\n\r\nHello Team B\r\n").encode()


def events(log_lines, name: str) -> list[dict]:
    return [e for e in log_lines() if e["event"] == name]


async def wait_for_event(log_lines, name: str, count: int, timeout: float = 30) -> list[dict]:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(events(log_lines, name)) < count:
        assert asyncio.get_running_loop().time() < deadline, f"fewer than {count} {name} logged"
        await asyncio.sleep(0.05)
    return events(log_lines, name)


async def test_internal_mail_hairpins_through_smtpgate_once(tmp_path, start_gate, log_lines):
    reinject = free_port()
    (tmp_path / "stamp.key").write_text(SECRET)
    config = load_config(write_config(tmp_path, f"""\
hostname: filter.corp.example
listeners:
  - name: content-filter
    address: 127.0.0.1:0
    relay_networks: [127.0.0.1/32]
upstream:
  url: smtp://127.0.0.1:{reinject}
  timeout: 20
stamp:
  secret_file: stamp.key
store:
  url: sqlite:{tmp_path}/smtpgate.db
  auto_upgrade: true
""" + TEAMS_A_B))
    gate, gate_port = await start_gate(config)
    postfix = PostfixInstance(tmp_path / "pf", services=reinjection_service(reinject),
                              main_cf={"content_filter": f"smtp:[127.0.0.1]:{gate_port}"})
    await asyncio.to_thread(postfix.start)
    try:
        await gate.snapshot.pool.probe()  # the reinjection smtpd is up now: learn its extensions
        # Internal-only mail: Team A's activity writes to Team B's mailbox, no external recipient.
        first = await send(postfix.host, postfix.port, mail_from="uk-payroll+101203-T@corp.example",
                           rcpt_tos=["pl-payroll@corp.example"], data=message("<hairpin1@corp.example>"))
        assert first.data[0] == 250
        [delivered] = await postfix.wait_for_delivery_async("pl-payroll", 1)
        block = parse_header_block(delivered)
        assert block.get_all("X-Original-To") == ["pl-payroll+900000-T@corp.example"]
        assert block.get_all("Delivered-To") == ["pl-payroll+900000-T@corp.example"]
        [stamp] = block.get_all("X-Smtpgate-Processed")
        assert verify_stamp(SECRET.encode(), "<hairpin1@corp.example>", stamp)
        [relayed] = await wait_for_event(log_lines, "message.relayed", 1)
        assert relayed["links_created"] == ["900000-T"]
        view = await gate.store.show("101203-T")
        assert [link.reference for link in view.links] == ["900000-T"]

        # A message that already carries a valid stamp goes through the filter again and is not
        # processed again: delivered untagged, as the client addressed it, and not recorded.
        stamped = message("<hairpin2@corp.example>",
                          f"X-Smtpgate-Processed: {make_stamp(SECRET.encode(), '<hairpin2@corp.example>')}")
        second = await send(postfix.host, postfix.port, mail_from="uk-payroll+101203-T@corp.example",
                            rcpt_tos=["pl-payroll@corp.example"], data=stamped)
        assert second.data[0] == 250
        both = [parse_header_block(m) for m in await postfix.wait_for_delivery_async("pl-payroll", 2)]
        [again] = [m for m in both if m.get("Message-ID") == "<hairpin2@corp.example>"]
        assert again.get_all("X-Original-To") == ["pl-payroll@corp.example"]
        assert len(again.get_all("X-Smtpgate-Processed")) == 1
        [already] = await wait_for_event(log_lines, "message.already_processed", 1)
        assert already["message_id"] == "<hairpin2@corp.example>"
        assert len((await gate.store.show("101203-T")).messages) == 1
        assert len(events(log_lines, "message.relayed")) == 2  # each message through smtpgate once
        assert len(list((postfix.maildir("pl-payroll") / "new").iterdir())) == 2
    finally:
        await asyncio.to_thread(postfix.stop)
