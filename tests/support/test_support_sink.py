"""The test sink behaves like the upstream the tests say it is."""

from __future__ import annotations

import asyncio
import smtplib

import pytest

from tests.support.sink import Sink, client_tls_context, make_test_tls
from tests.support.smtp import send
from tests.support.wire import Wire

MESSAGE = (
    b"From: a@corp.example\r\n"
    b"To: b@corp.example\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"body\r\n"
)


async def test_records_dsn_parameters_with_their_case():
    async with Sink() as sink:
        result = await send(
            sink.host,
            sink.port,
            mail_from="a@corp.example",
            rcpt_tos=["B@Corp.Example", "c@corp.example"],
            data=MESSAGE,
            mail_options=["RET=hdrs", "ENVID=Qq314159", "SIZE=200", "BODY=8BITMIME"],
            rcpt_options={
                "B@Corp.Example": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;B@Corp.Example"]
            },
        )
        assert "DSN" in result.ehlo[1].split("\n")
        assert "PIPELINING" in result.ehlo[1].split("\n")
        assert result.data[0] == 250
        [msg] = await sink.wait_for_messages(1)
    assert msg.mail_from == "a@corp.example"
    assert msg.mail_options == ["RET=hdrs", "ENVID=Qq314159", "SIZE=200", "BODY=8BITMIME"]
    assert msg.rcpt_tos == ["B@Corp.Example", "c@corp.example"]
    assert msg.rcpt_options == [["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;B@Corp.Example"], []]
    assert msg.data == MESSAGE
    assert msg.reply.startswith("250")
    assert msg.peer[0] == "127.0.0.1"


async def test_without_dsn_refuses_dsn_parameters():
    async with Sink(dsn=False) as sink:
        result = await send(
            sink.host,
            sink.port,
            mail_from="a@corp.example",
            rcpt_tos=["b@corp.example"],
            data=MESSAGE,
            mail_options=["RET=HDRS"],
        )
        assert "DSN" not in result.ehlo[1].split("\n")
        assert result.mail[0] == 555
        result = await send(
            sink.host,
            sink.port,
            mail_from="a@corp.example",
            rcpt_tos=["b@corp.example"],
            data=MESSAGE,
            rcpt_options={"b@corp.example": ["NOTIFY=NEVER"]},
        )
        assert result.rcpts["b@corp.example"][0] == 555
        assert not sink.messages


async def test_bad_dsn_values_are_refused():
    async with Sink() as sink:
        result = await send(
            sink.host,
            sink.port,
            mail_from="a@corp.example",
            rcpt_tos=["b@corp.example", "c@corp.example"],
            data=MESSAGE,
            mail_options=["RET=ALL"],
        )
        assert result.mail[0] == 501
        result = await send(
            sink.host,
            sink.port,
            mail_from="a@corp.example",
            rcpt_tos=["b@corp.example", "c@corp.example"],
            data=MESSAGE,
            rcpt_options={"b@corp.example": ["NOTIFY=NEVER,SUCCESS"], "c@corp.example": ["ORCPT=x"]},
        )
        assert result.rcpts["b@corp.example"][0] == 501
        assert result.rcpts["c@corp.example"][0] == 501


async def test_per_recipient_replies_and_plus_refusal():
    async with Sink() as sink:
        sink.rcpt_replies["Nobody@corp.example"] = "550 5.1.1 No such user"
        sink.rcpt_replies["busy@corp.example"] = "452 4.5.3 Too many recipients"
        sink.refuse_plus = True
        result = await send(
            sink.host,
            sink.port,
            mail_from="a@corp.example",
            rcpt_tos=[
                "nobody@CORP.example",
                "busy@corp.example",
                "pl-payroll+900001-T@corp.example",
                "ok@corp.example",
            ],
            data=MESSAGE,
        )
        assert result.rcpts == {
            "nobody@CORP.example": (550, "5.1.1 No such user"),
            "busy@corp.example": (452, "4.5.3 Too many recipients"),
            "pl-payroll+900001-T@corp.example": (
                550,
                "5.1.1 <pl-payroll+900001-T@corp.example>: Recipient address rejected: "
                "User unknown",
            ),
            "ok@corp.example": (250, "2.1.5 Ok"),
        }
        [msg] = await sink.wait_for_messages(1)
        assert msg.rcpt_tos == ["ok@corp.example"]


async def test_mail_and_data_replies():
    async with Sink() as sink:
        sink.mail_reply = "451 4.3.0 try later"
        result = await send(
            sink.host, sink.port, mail_from="a@corp.example", rcpt_tos=["b@corp.example"], data=MESSAGE
        )
        assert result.mail == (451, "4.3.0 try later")
        assert not any(c.startswith("RCPT") for c in sink.commands)

        sink.mail_reply = None
        sink.data_reply = "554 5.7.1 no"
        result = await send(
            sink.host, sink.port, mail_from="a@corp.example", rcpt_tos=["b@corp.example"], data=MESSAGE
        )
        assert result.data == (554, "5.7.1 no")
        [received] = await sink.wait_for_received(1)
        assert received.reply == "554 5.7.1 no"
        assert sink.messages == []
        assert sink.connections == 2


async def test_drop_after_data_closes_without_a_reply():
    async with Sink() as sink:
        sink.drop_after_data = True
        result = await send(
            sink.host, sink.port, mail_from="a@corp.example", rcpt_tos=["b@corp.example"], data=MESSAGE
        )
        assert result.data is not None and result.data[0] == 0
        [received] = await sink.wait_for_received(1)
        assert received.data == MESSAGE
        assert received.reply is None
        assert sink.messages == []


async def test_hold_data_delays_the_answer_to_the_dot():
    async with Sink() as sink:
        sink.hold_data = asyncio.Event()
        task = asyncio.create_task(
            send(sink.host, sink.port, mail_from="a@corp.example", rcpt_tos=["b@corp.example"], data=MESSAGE)
        )
        await sink.wait_for_received(1)
        assert not task.done() and sink.messages == []
        sink.hold_data.set()
        result = await asyncio.wait_for(task, 10)
        assert result.data[0] == 250
        assert len(sink.messages) == 1


async def test_commands_record_rset_and_the_null_sender():
    def session(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.test")
            assert client.mail("a@corp.example")[0] == 250
            assert client.rset()[0] == 250
            assert client.mail("")[0] == 250
            assert client.rcpt("b@corp.example")[0] == 250
            assert client.data(MESSAGE)[0] == 250

    async with Sink() as sink:
        await asyncio.to_thread(session, sink.port)
        [msg] = await sink.wait_for_messages(1)
        assert msg.mail_from == ""
        assert msg.helo == "client.test"
        verbs = [c.split(" ")[0] for c in sink.commands]
        assert verbs == ["EHLO", "MAIL", "RSET", "MAIL", "RCPT", "DATA", "QUIT"]
        await sink.wait_for_command("QUIT")


async def test_starttls_and_auth():
    context, cafile = make_test_tls()
    async with Sink(starttls_context=context, auth={"relay@corp.example": "s3cret"}, require_auth=True) as sink:
        plain = await send(
            sink.host, sink.port, mail_from="a@corp.example", rcpt_tos=["b@corp.example"], data=MESSAGE
        )
        assert plain.mail[0] == 530
        assert "STARTTLS" in plain.ehlo[1].split("\n")
        result = await send(
            sink.host,
            sink.port,
            mail_from="a@corp.example",
            rcpt_tos=["b@corp.example"],
            data=MESSAGE,
            starttls=True,
            tls_context=client_tls_context(cafile),
            login=("relay@corp.example", "s3cret"),
        )
        assert result.data[0] == 250
        [msg] = await sink.wait_for_messages(1)
        assert msg.tls and msg.auth_login == "relay@corp.example"
        assert any(c in ("AUTH PLAIN ***", "AUTH LOGIN ***") for c in sink.commands)
        assert all("s3cret" not in c for c in sink.commands)


async def test_wrong_password_is_refused():
    import aiosmtplib

    async with Sink(auth={"relay@corp.example": "s3cret"}) as sink:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
            await send(
                sink.host,
                sink.port,
                mail_from="a@corp.example",
                rcpt_tos=["b@corp.example"],
                data=MESSAGE,
                login=("relay@corp.example", "wrong"),
            )
        assert refused.value.code == 535


async def test_implicit_tls():
    context, cafile = make_test_tls()
    async with Sink(implicit_tls=context) as sink:
        result = await send(
            "localhost",
            sink.port,
            mail_from="a@corp.example",
            rcpt_tos=["b@corp.example"],
            data=MESSAGE,
            implicit_tls=True,
            tls_context=client_tls_context(cafile),
        )
        assert result.data[0] == 250
        [msg] = await sink.wait_for_messages(1)
        assert msg.tls


async def test_wait_for_messages_times_out_with_what_it_saw():
    async with Sink() as sink:
        with pytest.raises(TimeoutError, match="0 accepted"):
            await sink.wait_for_messages(1, timeout=0.2)


async def test_stop_cuts_a_held_session():
    async with Sink() as sink:
        sink.hold_data = asyncio.Event()
        task = asyncio.create_task(
            send(sink.host, sink.port, mail_from="a@corp.example", rcpt_tos=["b@corp.example"], data=MESSAGE)
        )
        await sink.wait_for_received(1)
    result = await asyncio.wait_for(task, 10)
    assert result.data[0] == 0


# ---------------------------------------------------------------- fault knobs


async def test_greeting_refusal_closes():
    async with Sink() as sink:
        sink.greeting = "421 4.3.2 Service not available"
        wire, greeting = await Wire.open(sink.port)
        assert greeting == "421 4.3.2 Service not available"
        assert await wire.reply() == ""  # closed


async def test_data_command_refused():
    async with Sink() as sink:
        sink.data_command_reply = "451 4.3.0 not now"
        result = await send(sink.host, sink.port, mail_from="a@corp.example", rcpt_tos=["b@corp.example"],
                            data=MESSAGE)
        assert result.data == (451, "4.3.0 not now")
        assert sink.received == [] and sink.messages == []


@pytest.mark.parametrize("stage", ["greeting", "MAIL", "RCPT", "DATA", "dot"])
async def test_stall_never_answers_that_stage(stage):
    async with Sink() as sink:
        sink.stall = {stage}
        lines = {"EHLO": "EHLO c.test", "MAIL": "MAIL FROM:<a@corp.example>", "RCPT": "RCPT TO:<b@corp.example>",
                 "DATA": "DATA", "dot": "Subject: x\r\n\r\nbody\r\n."}
        opening = asyncio.create_task(Wire.open(sink.port))
        if stage == "greeting":
            await sink.wait_for(lambda: sink.stalled == ["greeting"], what="stall at the greeting")
            assert not opening.done()
            opening.cancel()
        else:
            wire, greeting = await opening
            assert greeting.startswith("220")
            for name, line in lines.items():
                answer = asyncio.create_task(wire.cmd(line))
                if name == stage:
                    await sink.wait_for(lambda: sink.stalled == [stage], what=f"stall at {stage}")
                    assert not answer.done()
                    answer.cancel()
                    break
                assert (await answer)[:1] in ("2", "3"), name
        assert sink.messages == []
        assert len(sink.received) == (1 if stage == "dot" else 0)


async def test_raw_reply_replaces_one_reply():
    async with Sink() as sink:
        long_line = b"250 " + b"x" * 10_000 + b"\r\n"
        sink.raw_replies = {"RCPT": long_line}
        wire, _ = await Wire.open(sink.port)
        await wire.cmd("EHLO c.test")
        assert (await wire.cmd("MAIL FROM:<a@corp.example>")).startswith("250")
        await wire.send(b"RCPT TO:<b@corp.example>\r\n")
        assert await wire.reader.readexactly(len(long_line)) == long_line
        await wire.close()


async def test_without_8bitmime_refuses_body_8bitmime():
    async with Sink(eightbitmime=False) as sink:
        result = await send(sink.host, sink.port, mail_from="a@corp.example", rcpt_tos=["b@corp.example"],
                            data=MESSAGE, mail_options=["BODY=8BITMIME"])
        assert "8BITMIME" not in result.ehlo[1].split("\n")
        assert result.mail[0] == 555


async def test_drop_connections_cuts_sessions_and_keeps_listening():
    async with Sink() as sink:
        reader, writer = await asyncio.open_connection(sink.host, sink.port)
        assert (await reader.readline()).startswith(b"220 ")
        assert await sink.drop_connections() == 1
        assert await asyncio.wait_for(reader.read(), 10) == b""  # cut, no goodbye
        writer.close()
        result = await send(sink.host, sink.port, mail_from="a@corp.example", rcpt_tos=["b@corp.example"],
                            data=MESSAGE)
        assert result.data[0] == 250 and sink.connections == 2
