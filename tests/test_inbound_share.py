"""inbound.share_with_thread: a reply from outside that reaches only some of its thread's team
mailboxes also goes to the others, envelope only, through the SMTP front end and a real upstream
(an aiosmtpd sink the test controls). The mission's first message makes the thread: Team A
(uk-payroll, 101203-T) wrote to the client, copying Team B (pl-payroll, linked as 900000-T)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from smtpgate.config import load_config
from smtpgate.linking.share import REASONS
from tests.conftest import write_config
from tests.support.smtp import send
from tests.support.wire import strip_trace
from tests.test_inbound import NEW, config_text
from tests.frontends.milter.test_milter import milter_config  # noqa: F401 - the fixture
from tests.test_mission import STEP1

A = "uk-payroll+101203-T@corp.example"
B = f"pl-payroll+{NEW}@corp.example"
REPLY = (b"From: Client <client@supplier.example>\r\nTo: Team A <uk-payroll+101203-T@corp.example>\r\n"
         b"Subject: RE: Invoice 4411\r\nMessage-ID: <reply.1@supplier.example>\r\n"
         b"In-Reply-To: <step1.101203@corp.example>\r\n"
         b"References: <step1.101203@corp.example>\r\n\r\nThanks, paid today.\r\n")


def share_config(upstream: str, *, share: bool = True, mode: str = "enforce") -> str:
    text = config_text(upstream, "pass") + f"  share_with_thread: {'true' if share else 'false'}\n"
    return text.replace("    direction: inbound\n", f"    direction: inbound\n    mode: {mode}\n", 1)


@pytest.fixture
def thread(sink, tmp_path, start_gate, log_lines):
    """Start smtpgate with the given options, relay the thread message; returns the inbound port."""
    async def start(extra: str = "", **options):
        text = share_config(f"smtp://127.0.0.1:{sink.port}", **options) + extra
        config = load_config(write_config(tmp_path, text))
        gate, _ = await start_gate(config)
        outbound, inbound = (port for _, port in gate.bound)
        first = await send("127.0.0.1", outbound, mail_from=A, data=STEP1,
                           rcpt_tos=["client@supplier.example", "pl-payroll@corp.example"])
        assert first.data[0] == 250 and B in sink.messages[-1].rcpt_tos
        await gate.store.records.settled()  # other processes (`explain`) read the thread record
        return gate, inbound
    return start


async def reply(port, rcpts, data=REPLY, mail_from="client@supplier.example"):
    result = await send("127.0.0.1", port, mail_from=mail_from, rcpt_tos=rcpts, data=data)
    assert result.data is not None and result.data[0] == 250, result
    return result


def events(log_lines, name):
    return [e for e in log_lines() if e["event"] == name]


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_a_reply_to_team_a_only_also_reaches_team_b_envelope_only(thread, sink, log_lines):
    gate, inbound = await thread()
    messages, recipients = counter("smtpgate_messages_shared_total"), counter("smtpgate_recipients_shared_total")
    await reply(inbound, ["uk-payroll@corp.example"])
    msg = sink.messages[-1]
    assert msg.rcpt_tos == [A, B]
    assert strip_trace(msg.data)[1] == REPLY  # the header block as the client wrote it: Team B is not named
    [shared] = events(log_lines, "message.shared")
    assert {k: shared[k] for k in ("message_id", "in_reply_to", "added", "refused")} == {
        "message_id": "<reply.1@supplier.example>", "in_reply_to": "<step1.101203@corp.example>",
        "added": [B], "refused": []}
    [relayed] = [e for e in events(log_lines, "message.relayed") if e["message_id"] == shared["message_id"]]
    assert relayed["shared"] == [B]
    assert counter("smtpgate_messages_shared_total") == messages + 1
    assert counter("smtpgate_recipients_shared_total") == recipients + 1
    # Both activities' timelines list the reply, with the recipient sharing added.
    await gate.store.records.settled()
    for reference in ("101203-T", NEW):
        view = await gate.store.show(reference)
        [listed] = [m for m in view.messages if m.message_id == "<reply.1@supplier.example>"]
        assert listed.shared == [B] and listed.recipients == [A, B]


async def test_a_recipient_without_a_tag_is_listed_in_the_record_but_maps_to_no_activity(thread, sink):
    gate, inbound = await thread()
    await reply(inbound, ["uk-payroll@corp.example", "hr@corp.example"])
    assert sink.messages[-1].rcpt_tos == [A, "hr@corp.example", B]
    await gate.store.records.settled()
    for reference in ("101203-T", NEW):
        [listed] = [m for m in (await gate.store.show(reference)).messages
                    if m.message_id == "<reply.1@supplier.example>"]
        assert listed.recipients == [A, "hr@corp.example", B] and listed.shared == [B]


async def test_a_reply_without_message_id_is_shared_but_not_recorded(thread, sink, log_lines):
    gate, inbound = await thread()
    await reply(inbound, ["uk-payroll@corp.example"], data=REPLY.replace(b"Message-ID: <reply.1@supplier.example>\r\n", b""))
    assert sink.messages[-1].rcpt_tos == [A, B]
    await gate.store.records.settled()
    for reference in ("101203-T", NEW):
        assert [m.message_id for m in (await gate.store.show(reference)).messages] == ["<step1.101203@corp.example>"]


async def test_a_reply_to_team_b_only_also_reaches_team_a(thread, sink):
    _, inbound = await thread()
    await reply(inbound, [B])
    assert sink.messages[-1].rcpt_tos == [B, A]


@pytest.mark.parametrize("rcpts", [
    ["uk-payroll@corp.example", "pl-payroll@corp.example"],  # reply-all, tags dropped
    [A, "PL-Payroll@corp.example"],  # Team B's bare address, another spelling
    [A, B],
])
async def test_a_reply_that_names_every_team_adds_nothing(thread, sink, log_lines, rcpts):
    gate, inbound = await thread()
    await reply(inbound, rcpts)
    relayed = sink.messages[-1].rcpt_tos
    assert [r.lower() for r in relayed] == [A.lower(), B.lower()]  # Team B once, never twice
    assert not events(log_lines, "message.shared")
    await gate.store.records.settled()
    assert not [m for m in (await gate.store.show("101203-T")).messages if m.message_id.startswith("<reply")]


@pytest.mark.parametrize("name, data, mail_from", [
    ("out-of-office", b"Auto-Submitted: auto-replied\r\n" + REPLY, "client@supplier.example"),
    ("list", b"Precedence: bulk\r\n" + REPLY, "client@supplier.example"),
    ("bounce", REPLY, ""),
    ("outside any thread", REPLY.replace(b"<step1.101203@corp.example>", b"<other@supplier.example>"),
     "client@supplier.example"),
    ("stranger", REPLY.replace(b"client@supplier.example", b"someone@elsewhere.example"),
     "someone@elsewhere.example"),
])
async def test_automatic_mail_bounces_strangers_and_other_threads_are_not_shared(
        thread, sink, log_lines, name, data, mail_from):
    _, inbound = await thread()
    await reply(inbound, [A], data=data, mail_from=mail_from)
    assert sink.messages[-1].rcpt_tos == [A], name
    assert not events(log_lines, "message.shared")


@pytest.mark.parametrize("refusal", ["550 5.1.1 <x>: Recipient address rejected", "450 4.2.1 Mailbox busy"])
async def test_the_upstream_refusing_an_added_recipient_still_delivers_the_senders(thread, sink, log_lines,
                                                                                    refusal):
    gate, inbound = await thread()
    sink.rcpt_replies[B] = refusal
    result = await reply(inbound, ["uk-payroll@corp.example"])
    assert result.rcpts == {"uk-payroll@corp.example": (250, result.rcpts["uk-payroll@corp.example"][1])}
    assert sink.messages[-1].rcpt_tos == [A]
    [shared] = events(log_lines, "message.shared")
    assert shared["added"] == [] and shared["refused"] == [{"recipient": B, "reply": refusal}]
    # Nothing was shared: the reply is not in Team B's timeline.
    await gate.store.records.settled()
    assert not [m for m in (await gate.store.show(NEW)).messages if m.message_id.startswith("<reply")]


async def test_observe_mode_logs_what_it_would_share_and_adds_nothing(thread, sink, log_lines):
    _, inbound = await thread(mode="observe")
    await reply(inbound, [A])
    assert sink.messages[-1].rcpt_tos == [A]
    assert not events(log_lines, "message.shared")
    [observed] = [e for e in events(log_lines, "message.observed") if "would_share" in e]
    assert observed["would_share"] == [B] and observed["in_reply_to"] == "<step1.101203@corp.example>"


async def test_without_the_option_nothing_is_shared(thread, sink, log_lines):
    _, inbound = await thread(share=False)
    await reply(inbound, [A])
    assert sink.messages[-1].rcpt_tos == [A]
    assert not events(log_lines, "message.shared")


async def test_the_milter_adds_with_addrcpt_and_changes_no_header_field(milter_config, start_gate, log_lines):
    from tests.frontends.milter.test_milter import INBOUND_LISTENER, Milter

    gate, port = await start_gate(milter_config(listener=INBOUND_LISTENER,
                                                extra="inbound:\n  share_with_thread: true\n"))
    new, _ = await Milter(gate, port, log_lines).step1()
    inbound = Milter(gate, gate.bound[1][1], log_lines)
    actions = await inbound.send("client@supplier.example", [A], REPLY)
    assert actions == [("CONTINUE",), ("ADDRCPT", f"<pl-payroll+{new}@corp.example>"), ("ACCEPT",)]
    # Reply-all: nothing to add.
    both = await inbound.send("client@supplier.example", [A, f"pl-payroll+{new}@corp.example"], REPLY)
    assert both == [("CONTINUE",), ("CONTINUE",), ("ACCEPT",)]
    assert len(inbound.events("message.shared")) == 1


def explain(config_path, *args: str, stdin: bytes | None = None) -> str:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "smtpgate", "explain", *args, "-c", str(config_path)],
                         input=stdin, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode()


async def test_explain_shows_what_would_be_shared_and_why(thread, sink, tmp_path):
    import json

    gate, inbound = await thread(share=False)
    report = json.loads(explain(gate.config.path, "--inbound", "--json", "-", stdin=REPLY))
    assert report["share"] == {
        "enabled": False, "reason": "shared", "detail": REASONS["shared"],
        "thread_message_id": "<step1.101203@corp.example>", "source_reference": "101203-T",
        "would_add": [B], "already_named": [A]}
    assert report["recipients"] == [{"address": A, "target": A, "action": "unchanged",
                                     "reason": "nothing to restore"}]
    # The same report in words, in this process (the CLI above is the same function).
    from smtpgate.explain import explain_inbound, render_text

    both = await explain_inbound(REPLY, gate.snapshot.links,
                                 rcpts=["uk-payroll@corp.example", "pl-payroll@corp.example"])
    text = render_text(both)
    assert f"uk-payroll@corp.example -> {A}  [tag] the tag the thread message" in text
    assert f"complete: {REASONS['complete']}" in text and "inbound sharing: off" in text
    ooo = render_text(await explain_inbound(b"Auto-Submitted: auto-replied\r\n" + REPLY, gate.snapshot.links,
                                            share_with_thread=True))
    assert "inbound sharing: on" in ooo
    assert f"automatic: {REASONS['automatic']}" in ooo and "would add" not in ooo


async def test_explain_of_a_shared_message_names_the_recipients_sharing_added(thread, sink):
    import json

    gate, inbound = await thread()
    await reply(inbound, [A])
    await gate.store.records.settled()
    report = json.loads(explain(gate.config.path, "--message-id", "<reply.1@supplier.example>", "--json"))
    assert report["shared"] == [B] and report["recipients"] == [A, B]

    from smtpgate.explain import render_text

    assert f"added by inbound sharing: {B}" in render_text(report)


async def test_the_activities_page_marks_the_shared_reply_in_both_timelines(thread, sink, tmp_path):
    import aiohttp

    from tests.support.admin import ADMIN_YAML, write_tokens

    tokens = write_tokens(tmp_path)
    gate, inbound = await thread(extra=ADMIN_YAML)
    await reply(inbound, [A])
    await gate.store.records.settled()
    host, port = gate.admin.bound[0]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {tokens['admin']}"}) as client:
        for reference in ("101203-T", NEW):
            async with client.get(f"http://{host}:{port}/activities/{reference}") as response:
                assert response.status == 200
                html = await response.text()
            timeline = html[html.index('id="timeline"'):]
            # The thread message first, unmarked; then the reply, marked with what sharing added.
            first, shared = timeline.split("<li", 2)[1:]
            assert "step1.101203@corp.example" in first and "Shared" not in first
            assert shared.startswith(' class="shared"') and "reply.1@supplier.example" in shared
            assert f"<strong>Shared</strong>" in shared and f"smtpgate added {B} (envelope only)" in shared


async def test_the_milter_in_observe_mode_adds_nothing_and_records_nothing(milter_config, start_gate, log_lines):
    from tests.frontends.milter.test_milter import INBOUND_LISTENER, Milter

    observe = INBOUND_LISTENER + "    mode: observe\n"
    gate, port = await start_gate(milter_config(listener=observe, extra="inbound:\n  share_with_thread: true\n"))
    new, _ = await Milter(gate, port, log_lines).step1()
    inbound = Milter(gate, gate.bound[1][1], log_lines)
    assert await inbound.send("client@supplier.example", [A], REPLY) == [("CONTINUE",), ("ACCEPT",)]
    assert not inbound.events("message.shared")
    [observed] = [e for e in inbound.events("message.observed") if "would_share" in e]
    assert observed["would_share"] == [f"pl-payroll+{new}@corp.example"]
    assert not [m for m in (await gate.store.show(new)).messages if m.message_id.startswith("<reply")]


async def test_a_message_with_this_deployments_stamp_is_not_shared(thread, sink, log_lines, tmp_path):
    from smtpgate.explain import explain_inbound

    (tmp_path / "stamp.key").write_text("s" * 32 + "\n")
    gate, inbound = await thread(extra="stamp:\n  secret_file: stamp.key\n")
    stamped = gate.config.stamp.stamper.field("<reply.1@supplier.example>") + REPLY
    await reply(inbound, [A], data=stamped)
    assert sink.messages[-1].rcpt_tos == [A]
    assert events(log_lines, "message.already_processed") and not events(log_lines, "message.shared")
    report = await explain_inbound(stamped, gate.snapshot.links, share_with_thread=True)
    assert (report["share"]["reason"], report["share"]["would_add"]) == ("stamped", [])
    # A stamp of another deployment does not count: that reply is shared.
    forged = f"{gate.config.stamp.header}: v1:{'A' * 43}\r\n".encode() + REPLY
    await reply(inbound, [A], data=forged)
    assert sink.messages[-1].rcpt_tos == [A, B]
