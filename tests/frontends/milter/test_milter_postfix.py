"""smtpgate as the milter of a real Postfix (Debian's package, a private instance): the mission's first
two steps land tagged in corp.example's Maildirs, and a store failure makes Postfix answer 451."""

from __future__ import annotations

import asyncio
import re
import sqlite3

import pytest

from tests.support.postfix import PostfixInstance
from tests.support.smtp import send
from tests.frontends.milter.test_milter import MILTER_CONFIG, SENDER, STEP1, milter_config  # noqa: F401 - the fixture

pytestmark = pytest.mark.postfix

# External mail is discarded by this Postfix: what the mailboxes got is what the test reads.
DISCARD = {"default_transport": "discard:external mail in tests",
           "relay_transport": "discard:external mail in tests"}
# hr@corp.example has no mailbox on this Postfix; the external copy stands in for it.
STEP1_HERE = STEP1.replace(b"hr@corp.example (Human Resources)", b"client2@supplier.example")
STEP2 = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll@corp.example\r\n"
         b"Subject: follow-up\r\nMessage-ID: <step2.101203@corp.example>\r\n\r\nsecond\r\n")


@pytest.fixture
async def milter_postfix(tmp_path, milter_config, start_gate, log_lines):  # noqa: F811
    async def start(store_timeout: float = 10):
        gate, port = await start_gate(milter_config(store_timeout=store_timeout))
        postfix = PostfixInstance(tmp_path / "pf", milter=("127.0.0.1", port), main_cf=DISCARD)
        await asyncio.to_thread(postfix.start)
        started.append(postfix)
        return gate, postfix

    started: list[PostfixInstance] = []
    yield start
    for postfix in started:
        await asyncio.to_thread(postfix.stop)


async def test_mission_steps_1_and_2_through_postfix(milter_postfix, log_lines):
    gate, postfix = await milter_postfix()
    first = await send("127.0.0.1", postfix.port, mail_from=SENDER,
                       rcpt_tos=["client@supplier.example", "pl-payroll@corp.example", "client2@supplier.example"],
                       data=STEP1_HERE)
    assert first.data is not None and first.data[0] == 250, (first, postfix.maillog())
    new = await gate.store.find_link("101203-T", "pl-payroll@corp.example")
    assert new is not None and re.fullmatch(r"\d+-T", new)
    [landed] = await postfix.wait_for_delivery_async("pl-payroll", count=1)
    # Postfix delivered to the tagged envelope recipient the milter put in place of the original.
    assert f"X-Original-To: pl-payroll+{new}@corp.example\n".encode() in landed
    assert f"Delivered-To: pl-payroll+{new}@corp.example\n".encode() in landed
    assert (f'Cc: "Payroll, Poland" <pl-payroll+{new}@corp.example>,\n'
            f'  client2@supplier.example\n').encode() in landed
    assert b"From: Team A <uk-payroll+101203-T@corp.example>\n" in landed
    assert landed.endswith(b"\nDear client,\nplease find the invoice.\n")
    thread = await gate.store.find_thread(["<step1.101203@corp.example>"])
    assert thread is not None and thread.source_reference == "101203-T"

    second = await send("127.0.0.1", postfix.port, mail_from=SENDER, rcpt_tos=["pl-payroll@corp.example"],
                        data=STEP2)
    assert second.data is not None and second.data[0] == 250
    both = await postfix.wait_for_delivery_async("pl-payroll", count=2)
    [reused] = [m for m in both if b"second" in m]
    assert f"X-Original-To: pl-payroll+{new}@corp.example\n".encode() in reused
    assert f"To: pl-payroll+{new}@corp.example\n".encode() in reused
    relayed = [e for e in log_lines() if e["event"] == "message.relayed"]
    assert [e["links_created"] for e in relayed] == [[new], []]
    assert relayed[1]["links_reused"] == [new]
    # The queue ids in smtpgate's log are Postfix's: an admin can follow a message across both logs.
    # Once Postfix is done with both messages, no copy went to the untagged original (DELRCPT worked).
    for event in relayed:
        await removed_from_queue(postfix, event["queue_id"])
    assert "to=<pl-payroll@corp.example>" not in postfix.maillog()
    assert postfix.maillog().count(f"to=<pl-payroll+{new}@corp.example>") == 2


async def removed_from_queue(postfix: PostfixInstance, queue_id: str, timeout: float = 30) -> None:
    """Wait until Postfix has finished every recipient of the message queue_id (qmgr logs 'removed')."""
    deadline = asyncio.get_running_loop().time() + timeout
    while f"{queue_id}: removed" not in postfix.maillog():
        assert asyncio.get_running_loop().time() < deadline, postfix.maillog()
        await asyncio.sleep(0.05)


async def test_store_unavailable_postfix_answers_451_and_delivers_nothing(milter_postfix, log_lines, tmp_path):
    gate, postfix = await milter_postfix(store_timeout=1)
    data = (b"From: uk-payroll+77-C@corp.example\r\nTo: pl-payroll@corp.example\r\n"
            b"Subject: another case\r\nMessage-ID: <retry@corp.example>\r\n\r\nretry me\r\n")
    blocker = sqlite3.connect(tmp_path / "smtpgate.db", timeout=10, check_same_thread=False)
    await asyncio.to_thread(blocker.execute, "BEGIN IMMEDIATE")
    try:
        result = await send("127.0.0.1", postfix.port, mail_from="uk-payroll+77-C@corp.example",
                            rcpt_tos=["pl-payroll@corp.example"], data=data)
    finally:
        blocker.rollback()
        blocker.close()
    assert result.data is not None and result.data[0] == 451, result
    assert result.data[1].startswith("4.3.0"), result.data
    # Refused at end of DATA: never queued, so nothing can be delivered later either.
    assert "milter-reject: END-OF-MESSAGE" in postfix.maillog()
    assert "status=sent" not in postfix.maillog()
    assert not list((postfix.maildir("pl-payroll") / "new").iterdir())
    assert await gate.store.find_link("77-C", "pl-payroll@corp.example") is None
    # The client retries with the store back: delivered, tagged.
    retry = await send("127.0.0.1", postfix.port, mail_from="uk-payroll+77-C@corp.example",
                       rcpt_tos=["pl-payroll@corp.example"], data=data)
    assert retry.data is not None and retry.data[0] == 250
    new = await gate.store.find_link("77-C", "pl-payroll@corp.example")
    [landed] = await postfix.wait_for_delivery_async("pl-payroll", count=1)
    assert f"X-Original-To: pl-payroll+{new}@corp.example\n".encode() in landed


async def test_locally_submitted_mail_goes_through_non_smtpd_milters(tmp_path, milter_config,  # noqa: F811
                                                                     start_gate, log_lines):
    """A work-management system on the Postfix host hands mail to sendmail(1): cleanup plays the SMTP
    events for the milter, and the mail is tagged the same way."""
    gate, port = await start_gate(milter_config())
    postfix = PostfixInstance(tmp_path / "pf", main_cf={**DISCARD, "non_smtpd_milters": f"inet:127.0.0.1:{port}",
                                                        "milter_default_action": "tempfail"})
    await asyncio.to_thread(postfix.start)
    try:
        done = await asyncio.create_subprocess_exec(
            "/usr/sbin/sendmail", "-C", str(postfix.config_dir), "-f", SENDER, "--", "pl-payroll@corp.example",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(done.communicate(STEP2.replace(b"\r\n", b"\n")), 60)
        assert done.returncode == 0, err
        [landed] = await postfix.wait_for_delivery_async("pl-payroll", count=1)
        new = await gate.store.find_link("101203-T", "pl-payroll@corp.example")
        assert new is not None
        assert f"X-Original-To: pl-payroll+{new}@corp.example\n".encode() in landed
        assert f"To: pl-payroll+{new}@corp.example\n".encode() in landed
    finally:
        await asyncio.to_thread(postfix.stop)
