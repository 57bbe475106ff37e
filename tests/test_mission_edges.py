"""Linking edge cases on the wire, beyond the story of tests/test_mission.py: one case for
each behaviour a client sees (a source found in a configured header or an encoded subject,
an over-long tag, header shapes rewritten only in the addr-spec).

Every test talks SMTP over loopback to a real smtpgate relaying to a sink, with its links
in a real SQLite store. The decisions behind them, and their edges (precedence, the
source's own mailbox, threads, custom patterns, teams, duplicates), are unit tests in
tests/linking/test_link_edges.py.
"""

from __future__ import annotations

import re

import pytest

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.test_mission import MISSION_CONFIG, STEP1, Mission, body_of, mission, mission_config  # noqa: F401

LONG = "a" * 58  # a mailbox local part that cannot take a "+" and an 8-character tag (64 octets)

EDGE_CONFIG = """\
hostname: relay.test.example
listeners:
  - name: submission
    address: 127.0.0.1:0
    relay_networks: [127.0.0.1/32]
upstream:
  url: {upstream}
  timeout: 10
internal_domains: [corp.example]
mailboxes:
  - address: uk-payroll@corp.example
    team: Team A (UK)
  - address: uk-pensions@corp.example
    team: Team A (UK)
  - address: pl-payroll@corp.example
    team: Team B (Poland)
  - address: {long}@corp.example
    team: Team L (Long)
references:
  pattern: "T-[0-9]+|[0-9]{{1,12}}-[TCA]"
  headers: [X-Enate-Reference, X-Case]
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
"""


@pytest.fixture
async def edge(sink, tmp_path, start_gate, log_lines):
    text = EDGE_CONFIG.format(upstream=f"smtp://127.0.0.1:{sink.port}", long=LONG)
    gate, port = await start_gate(load_config(write_config(tmp_path, text)))
    return Mission(gate, port, sink, log_lines)


def tagged_as(rcpts: list[str], base: str) -> str:
    """The reference ``base`` was tagged with among the relayed recipients."""
    [ref] = [m.group(1) for r in rcpts if (m := re.fullmatch(rf"{re.escape(base)}\+(.+)@corp\.example", r))]
    return ref


# ---------------------------------------------------------------- source detection

async def test_source_from_configured_header(mission):
    data = (b"From: Jane <jane@corp.example>\r\nTo: pl-payroll@corp.example\r\n"
            b"X-Enate-Reference: 101203-T\r\nSubject: no reference here\r\n\r\nbody\r\n")
    await mission.send("jane@corp.example", ["pl-payroll@corp.example"], data)
    msg = mission.sink.messages[-1]
    new = tagged_as(msg.rcpt_tos, "pl-payroll")
    assert body_of(msg.data) == data.replace(b"To: pl-payroll@", f"To: pl-payroll+{new}@".encode())
    event = mission.relayed_events()[-1]
    assert event["source_reference"] == "101203-T" and event["source_found_in"] == "header"


async def test_rfc2047_encoded_subject_reference(mission):
    new = await mission.step1()
    data = (b"From: Jane <jane@corp.example>\r\nTo: pl-payroll@corp.example\r\n"
            b"Subject: =?utf-8?q?Re=3A_R=C3=A9clamation_=5B101203-T=5D?=\r\n\r\nbody\r\n")
    await mission.send("jane@corp.example", ["pl-payroll@corp.example"], data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == [f"pl-payroll+{new}@corp.example"]
    assert body_of(msg.data) == data.replace(b"To: pl-payroll@", f"To: pl-payroll+{new}@".encode())
    assert mission.relayed_events()[-1]["source_found_in"] == "subject"


# ---------------------------------------------------------------- tags and header shapes

async def test_tag_over_64_octets_left_untagged_and_logged(edge):
    long_addr = f"{LONG}@corp.example"
    data = (f"From: uk-payroll+101203-T@corp.example\r\nTo: {long_addr}, pl-payroll@corp.example\r\n"
            f"Subject: long\r\n\r\nbody\r\n").encode()
    await edge.send("uk-payroll+101203-T@corp.example", [long_addr, "pl-payroll@corp.example"], data)
    msg = edge.sink.messages[-1]
    new = tagged_as(msg.rcpt_tos, "pl-payroll")
    assert msg.rcpt_tos == [long_addr, f"pl-payroll+{new}@corp.example"]
    assert body_of(msg.data) == data.replace(b", pl-payroll@", f", pl-payroll+{new}@".encode())
    warnings = [e for e in edge.log_lines() if e["event"] == "address.untaggable"]
    assert [w["address"] for w in warnings] == [long_addr]


async def test_groups_and_several_to_fields_rewritten(mission):
    new = await mission.step1()
    data = (b"From: uk-payroll+101203-T@corp.example\r\n"
            b"To: Payroll teams: \"UK\" <uk-payroll@corp.example>,\r\n"
            b"  pl-payroll@corp.example (Poland);, client@supplier.example\r\n"
            b"To: undisclosed-recipients:;\r\n"
            b"To: =?utf-8?q?Pologne?= <pl-payroll@corp.example>\r\n"
            b"Cc: (none) hr@corp.example\r\nSubject: groups\r\n\r\nTo: pl-payroll@corp.example\r\n")
    await mission.send("uk-payroll+101203-T@corp.example",
                       ["uk-payroll@corp.example", "pl-payroll@corp.example", "client@supplier.example"], data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["uk-payroll+101203-T@corp.example", f"pl-payroll+{new}@corp.example",
                            "client@supplier.example"]
    head, _, body = data.partition(b"\r\n\r\n")
    expected = head.replace(b"<uk-payroll@", b"<uk-payroll+101203-T@").replace(
        b"pl-payroll@", f"pl-payroll+{new}@".encode()) + b"\r\n\r\n" + body
    assert body_of(msg.data) == expected
