"""`smtpgate explain` on real .eml files (tests/data/explain/), as an admin runs it: each
source rule, each recipient class, automatic mail, new_links: never, an untaggable mailbox,
a malformed file, and --message-id for a relayed message. The store is read, never written."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from smtpgate.config import load_config
from smtpgate.explain import read_message
from smtpgate.linking.decision import Envelope, EnvelopeRecipient
from smtpgate.linking.plan import Directory
from smtpgate.linking.service import LinkService
from smtpgate.mail.addresses import parse_path
from smtpgate.mail.headers import parse_header_block
from smtpgate.store import open_store
from smtpgate.store.allocation import LocalAllocator
from tests.conftest import write_config
from tests.support.configs import TEAMS_A_B

DATA = Path(__file__).parent / "data" / "explain"
FIRST = 900000
NEW = f"{FIRST}-T"
LONG = "a-very-long-team-mailbox-name-that-fills-almost-all-of-it@corp.example"

CONFIG = f"""\
hostname: relay.test.example
listeners:
  - name: submission
    address: 127.0.0.1:0
    relay_networks: [127.0.0.1/32]
upstream:
  url: maildir:outbox
{TEAMS_A_B}\
  - address: de-payroll@corp.example
    team: Team C (Germany)
  - address: fr-payroll@corp.example
    team: Team D (France)
    new_links: never
  - address: {LONG}
    team: Team L
allocator:
  first_number: {FIRST}
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
"""


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A store where the mission's first message was relayed: 101203-T linked to NEW."""
    folder = tmp_path_factory.mktemp("explain")
    path = write_config(folder, CONFIG)
    config = load_config(path)

    async def seed():
        store = await open_store(config.store.url, base_dir=folder, allocator=LocalAllocator(FIRST),
                                 auto_upgrade=True)
        links = LinkService(store, Directory(config.core), hostname="relay.test.example")
        raw = read_message((DATA / "tag-new-link.eml").read_bytes())
        rcpts = ("client@supplier.example", "pl-payroll@corp.example", "hr@corp.example")
        envelope = Envelope(parse_path("uk-payroll+101203-T@corp.example"),
                            tuple(EnvelopeRecipient(parse_path(r)) for r in rcpts))
        decision = await links.decide(envelope, parse_header_block(raw))
        assert decision.source.created == (NEW,)
        await links.record(decision, decision.targets())
        await store.close()

    asyncio.run(seed())
    return path


def counts(path: Path) -> tuple[int, ...]:
    with sqlite3.connect(path.parent / "smtpgate.db") as conn:
        return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                     for t in ("activities", "links", "messages"))


def explain(config: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smtpgate", "explain", *args, "-c", str(config)],
                          capture_output=True, input=stdin, timeout=60)


def report(config: Path, name: str, *args: str) -> dict:
    before = counts(config)
    out = explain(config, str(DATA / name), "--json", *args)
    assert out.returncode == 0, out.stderr
    assert counts(config) == before  # read-only
    return json.loads(out.stdout)


def by_address(rep: dict) -> dict[str, dict]:
    return {r["address"]: r for r in rep["recipients"]}


def test_the_json_shape(seeded):
    rep = report(seeded, "tag-new-link.eml")
    assert set(rep) == {"message_id", "envelope", "source", "automatic", "recipients", "links", "header_diff"}
    assert set(rep["source"]) == {"reference", "found_in", "mailbox", "steps"}
    assert all(set(s) == {"rule", "matched", "detail"} for s in rep["source"]["steps"])
    assert all(set(r) == {"address", "class", "target", "action", "reason"} for r in rep["recipients"])
    assert set(rep["links"]) == {"would_create", "would_reuse"}


def test_tag_rule_and_reuse_with_the_header_diff(seeded):
    rep = report(seeded, "tag-new-link.eml")
    assert (rep["source"]["reference"], rep["source"]["found_in"]) == ("101203-T", "envelope")
    assert rep["source"]["steps"] == [{"rule": "tag", "matched": True, "detail":
                                       "the envelope sender is mailbox uk-payroll@corp.example tagged 101203-T"}]
    assert rep["envelope"]["recipients"] == ["client@supplier.example", "pl-payroll@corp.example",
                                             "hr@corp.example"]  # from To and Cc
    rcpts = by_address(rep)
    assert rcpts["pl-payroll@corp.example"]["target"] == f"pl-payroll+{NEW}@corp.example"
    assert rcpts["pl-payroll@corp.example"]["reason"] == f"existing link 101203-T <-> {NEW} reused"
    assert (rcpts["client@supplier.example"]["class"], rcpts["client@supplier.example"]["action"]) == (
        "external", "unchanged")
    assert (rcpts["hr@corp.example"]["class"], rcpts["hr@corp.example"]["action"]) == ("internal", "unchanged")
    assert f'-Cc: "Payroll, Poland" <pl-payroll@corp.example>' in rep["header_diff"]
    assert f'+Cc: "Payroll, Poland" <pl-payroll+{NEW}@corp.example>' in rep["header_diff"]


def test_header_rule_and_the_source_mailbox(seeded):
    rep = report(seeded, "header-source.eml")
    steps = rep["source"]["steps"]
    assert [(s["rule"], s["matched"]) for s in steps] == [("tag", False), ("header", True)]
    own = by_address(rep)["uk-payroll@corp.example"]
    assert (own["class"], own["target"]) == ("source_mailbox", "uk-payroll+101203-T@corp.example")


def test_subject_rule(seeded):
    rep = report(seeded, "subject-source.eml")
    assert [(s["rule"], s["matched"]) for s in rep["source"]["steps"]] == [
        ("tag", False), ("header", False), ("subject", True)]
    assert rep["source"]["steps"][1]["detail"] == "header absent (X-Enate-Reference)"


def test_thread_rule(seeded):
    rep = report(seeded, "thread-reply.eml", "--mail-from", "client@supplier.example")
    assert rep["source"]["found_in"] == "thread"
    rcpts = by_address(rep)
    assert rcpts["uk-payroll@corp.example"]["target"] == "uk-payroll+101203-T@corp.example"
    assert rcpts["pl-payroll@corp.example"]["target"] == f"pl-payroll+{NEW}@corp.example"


def test_no_source_says_why_for_every_rule(seeded):
    rep = report(seeded, "no-source.eml")
    assert rep["source"]["reference"] is None
    details = {s["rule"]: s["detail"] for s in rep["source"]["steps"]}
    assert details["tag"].startswith("no tag")
    assert details["header"] == "header absent (X-Enate-Reference)"
    assert details["subject"] == "Subject has no reference: 'hello'"
    assert details["thread"] == "thread unknown: smtpgate relayed none of <never.seen@supplier.example>"
    assert [r["action"] for r in rep["recipients"]] == ["unchanged"]


def test_explicit_tag_and_new_links_never(seeded):
    rep = report(seeded, "explicit-and-never.eml")
    rcpts = by_address(rep)
    tagged = rcpts["pl-payroll+5512-C@corp.example"]
    assert (tagged["class"], tagged["action"]) == ("tagged_mailbox", "kept")
    assert "would be recorded" in tagged["reason"]
    copy = rcpts["pl-payroll@corp.example"]
    assert copy["action"] == "merged"  # becomes the tagged address named in To: sent once
    never = rcpts["fr-payroll@corp.example"]
    assert (never["action"], never["reason"]) == ("unchanged", "new_links: never, and no linked activity exists")


def test_automatic_mail_and_an_untaggable_mailbox(seeded):
    auto = report(seeded, "automatic.eml")
    assert auto["automatic"] is True
    assert by_address(auto)["de-payroll@corp.example"]["reason"].startswith("automatic mail")
    long = report(seeded, "untaggable.eml")
    assert by_address(long)[LONG]["action"] == "new_activity"  # the reference's length is known only then


def test_text_output_and_stdin(seeded):
    out = explain(seeded, "-", stdin=(DATA / "subject-source.eml").read_bytes())
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "source activity: 101203-T (found in subject)" in text
    assert "no match: tag:" in text and "matched: subject: Subject names 101203-T" in text


def test_a_malformed_or_unreadable_file_is_exit_2(seeded, tmp_path):
    out = explain(seeded, str(DATA / "malformed.eml"))
    assert out.returncode == 2
    assert b"malformed.eml: no header fields: not a mail message" in out.stderr
    missing = explain(seeded, str(tmp_path / "nope.eml"))
    assert missing.returncode == 2 and b"cannot read" in missing.stderr


def test_message_id_shows_what_was_done(seeded):
    out = explain(seeded, "--message-id", "<step1.101203@corp.example>", "--json")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["source"]["reference"] == "101203-T"
    assert rep["mapping"]["pl-payroll@corp.example"] == NEW
    assert f"pl-payroll+{NEW}@corp.example" in rep["recipients"]
    unknown = explain(seeded, "--message-id", "<nope@x>")
    assert unknown.returncode == 1 and b"relayed no message" in unknown.stderr
