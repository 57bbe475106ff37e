"""Private Postfix instances deliver, relay and defer the way the integration tests expect."""

from __future__ import annotations

import asyncio
import os
import shutil
import smtplib
import socket
from pathlib import Path

import pytest

from tests.support import postfix as postfix_module
from tests.support.postfix import PostfixError, PostfixInstance
from tests.support.sink import Sink

MESSAGE = (
    b"From: Client <client@supplier.example>\r\n"
    b"To: pl-payroll@corp.example\r\n"
    b"Subject: payslip 101203-T\r\n"
    b"Message-ID: <m1@supplier.example>\r\n"
    b"\r\n"
    b"hello\r\n"
)


def _send(port: int, rcpts: list[str], mail_from: str = "client@supplier.example") -> dict:
    """Send MESSAGE; return smtplib's refused-recipients dict (raises if all are refused)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        return client.sendmail(mail_from, rcpts, MESSAGE)


def _default_main_cf() -> bytes | None:
    path = postfix_module.DEFAULT_CONFIG / "main.cf"
    return path.read_bytes() if path.exists() else None


def _header(message: bytes, name: str) -> list[str]:
    head = message.split(b"\n\n", 1)[0].decode()
    return [
        line.split(":", 1)[1].strip()
        for line in head.splitlines()
        if line.lower().startswith(name.lower() + ":")
    ]


@pytest.mark.postfix
def test_plus_address_lands_in_the_mailbox_maildir(tmp_path):
    with PostfixInstance(tmp_path) as postfix:
        assert str(postfix.config_dir) in postfix_module._alternates(_default_main_cf().decode())
        refused = _send(postfix.port, ["pl-payroll+900001-T@corp.example"])
        assert refused == {}
        [message] = postfix.wait_for_delivery("pl-payroll")
        assert _header(message, "X-Original-To") == ["pl-payroll+900001-T@corp.example"]
        assert _header(message, "Delivered-To") == ["pl-payroll+900001-T@corp.example"]
        assert b"Subject: payslip 101203-T" in message
        assert "status=sent" in postfix.maillog()
        assert list((postfix.maildir("uk-payroll") / "new").iterdir()) == []
    # Its folder is listed no more. (Other instances, of other test runs on this machine,
    # may come and go meanwhile: the whole file is not compared with what it was.)
    after = _default_main_cf()
    assert after is None or str(postfix.config_dir) not in postfix_module._alternates(after.decode())


@pytest.mark.postfix
def test_without_plus_addressing_a_tagged_address_is_refused(tmp_path):
    with PostfixInstance(tmp_path, recipient_delimiter="") as postfix:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            _send(postfix.port, ["pl-payroll+900001-T@corp.example"])
        [(code, _)] = refused.value.recipients.values()
        assert code == 550
        assert _send(postfix.port, ["pl-payroll@corp.example"]) == {}
        [message] = postfix.wait_for_delivery("pl-payroll@corp.example")
        assert _header(message, "Delivered-To") == ["pl-payroll@corp.example"]


@pytest.mark.postfix
async def test_relays_everything_to_the_relayhost(tmp_path):
    async with Sink() as sink:
        postfix = PostfixInstance(tmp_path, relayhost=(sink.host, sink.port))
        await asyncio.to_thread(postfix.start)
        try:
            refused = await asyncio.to_thread(
                _send, postfix.port, ["pl-payroll@corp.example", "someone@supplier.example"]
            )
            assert refused == {}
            [message] = await sink.wait_for_messages(1, timeout=30)
        finally:
            await asyncio.to_thread(postfix.stop)
    assert sorted(message.rcpt_tos) == ["pl-payroll@corp.example", "someone@supplier.example"]
    assert message.mail_from == "client@supplier.example"
    assert b"Message-ID: <m1@supplier.example>" in message.data


@pytest.mark.postfix
def test_a_dead_milter_defers_mail(tmp_path):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        milter_port = unused.getsockname()[1]
    # Nothing listens there once the socket is closed: the milter is down.
    with PostfixInstance(tmp_path, milter=("127.0.0.1", milter_port)) as postfix:
        with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as client:
            client.ehlo("client.test")
            code, _ = client.mail("client@supplier.example")
            if code == 250:
                code, _ = client.rcpt("pl-payroll@corp.example")
            assert 400 <= code < 500


@pytest.mark.postfix
def test_two_instances_at_once_keep_listed_folders(tmp_path):
    # A folder some other Postfix setup of this machine lists; edited under the helper's lock,
    # and taken out again alone, so concurrent test runs keep their own entries.
    keep = "/srv/other-instance/etc"
    path = postfix_module.DEFAULT_CONFIG / "main.cf"
    postfix_module._register(Path(keep))
    try:
        with PostfixInstance(tmp_path / "a") as first, PostfixInstance(tmp_path / "b") as second:
            assert first.port != second.port
            listed = postfix_module._alternates(path.read_text())
            assert {keep, str(first.config_dir), str(second.config_dir)} <= set(listed)
            assert _send(second.port, ["uk-payroll+101203-T@corp.example"]) == {}
            second.wait_for_delivery("uk-payroll")
            assert not (first.maildir("uk-payroll") / "new").exists() or not list(
                (first.maildir("uk-payroll") / "new").iterdir()
            )
        listed = postfix_module._alternates(path.read_text())
        assert keep in listed
        assert str(first.config_dir) not in listed and str(second.config_dir) not in listed
    finally:
        postfix_module._unregister(Path(keep))


@pytest.mark.postfix
def test_wait_for_delivery_times_out_with_the_maillog(tmp_path):
    with PostfixInstance(tmp_path) as postfix:
        with pytest.raises(PostfixError, match="maillog"):
            postfix.wait_for_delivery("pl-payroll", timeout=0.3)


def test_main_cf_editing_keeps_other_settings_and_folders():
    text = (
        "# site settings\n"
        "myhostname = mx.example\n"
        "alternate_config_directories = /etc/postfix-out,\n"
        "    /etc/postfix-in\n"
        "mynetworks = 127.0.0.0/8\n"
    )
    assert postfix_module._alternates(text) == ["/etc/postfix-out", "/etc/postfix-in"]
    added = postfix_module._with_alternates(text, ["/etc/postfix-out", "/etc/postfix-in", "/tmp/x/etc"])
    assert postfix_module._alternates(added) == ["/etc/postfix-out", "/etc/postfix-in", "/tmp/x/etc"]
    assert "myhostname = mx.example\n" in added and "mynetworks = 127.0.0.0/8\n" in added
    removed = postfix_module._with_alternates(added, [])
    assert "alternate_config_directories" not in removed
    assert removed == "# site settings\nmyhostname = mx.example\nmynetworks = 127.0.0.0/8\n"


@pytest.mark.postfix
def test_master_cf_listens_on_the_chosen_port_without_chroot():
    master = postfix_module._master_cf("127.0.0.1", 2526)
    services = [line.split() for line in master.splitlines() if line and line[0].isalnum()]
    assert ["127.0.0.1:2526", "inet"] == services[0][:2]
    assert all(fields[4] == "n" for fields in services if len(fields) >= 8)


@pytest.mark.postfix
def test_tmp_path_is_reached_through_a_traversable_folder(tmp_path):
    root, own = postfix_module._traversable_folder(tmp_path)
    try:
        for folder in [root, *root.parents]:
            assert os.stat(folder).st_mode & 0o001, folder
        assert (tmp_path / "postfix").resolve() == root.resolve()
    finally:
        if own:
            shutil.rmtree(root)
    assert isinstance(root, Path)


@pytest.mark.postfix
async def test_async_wait_for_delivery(tmp_path):
    postfix = PostfixInstance(tmp_path)
    await asyncio.to_thread(postfix.start)
    try:
        await asyncio.to_thread(_send, postfix.port, ["uk-payroll+101203-T@corp.example"])
        [message] = await postfix.wait_for_delivery_async("uk-payroll", timeout=30)
        assert _header(message, "Delivered-To") == ["uk-payroll+101203-T@corp.example"]
        with pytest.raises(PostfixError):
            await postfix.wait_for_delivery_async("uk-payroll", count=2, timeout=0.2)
    finally:
        await asyncio.to_thread(postfix.stop)
