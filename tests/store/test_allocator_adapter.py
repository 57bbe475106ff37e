"""docs/allocator-adapter.py, the reference http allocator the README shows, behind a real smtpgate."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tests.support.smtp import send

ADAPTER = Path(__file__).resolve().parents[2] / "docs" / "allocator-adapter.py"

MESSAGE = (b"From: Team A <uk-payroll+101203-T@corp.example>\r\nTo: client@supplier.example\r\n"
           b"Cc: Team B <pl-payroll@corp.example>\r\nSubject: Invoice 4411\r\n"
           b"Message-ID: <adapter-1@corp.example>\r\n\r\nHello\r\n")


@pytest.fixture
async def adapter(tmp_path):
    """The adapter on a free loopback port: (url, token file)."""
    token = tmp_path / "allocator.token"
    token.write_text("s3cret-allocator-token\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ADAPTER), "127.0.0.1", "0", stdout=asyncio.subprocess.PIPE,
        env={"ALLOCATOR_TOKEN_FILE": str(token), "PATH": "/usr/bin:/bin"})
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    assert line.startswith("listening on "), line
    yield f"http://{line.split()[-1]}/linked-activities", token
    proc.terminate()
    await proc.wait()


async def relay(config_for, start_gate, sink, url: str, token: Path):
    config = config_for(f"smtp://127.0.0.1:{sink.port}",
                        f"allocator:\n  kind: http\n  url: {url}\n  token_file: {token}\n  timeout: 5\n")
    _, port = await start_gate(config)
    return await send("127.0.0.1", port, mail_from="uk-payroll+101203-T@corp.example",
                      rcpt_tos=["client@supplier.example", "pl-payroll@corp.example"], data=MESSAGE)


async def test_the_adapter_allocates_the_linked_activity(adapter, config_for, start_gate, sink, log_lines):
    url, token = adapter
    result = await relay(config_for, start_gate, sink, url, token)
    assert result.data is not None and result.data[0] == 250, result
    [message] = await sink.wait_for_messages(1)
    assert message.rcpt_tos == ["client@supplier.example", "pl-payroll+700000-T@corp.example"]
    assert b"Cc: Team B <pl-payroll+700000-T@corp.example>\r\n" in message.data


async def test_a_wrong_token_is_a_temporary_failure(adapter, config_for, start_gate, sink, tmp_path, log_lines):
    url, _ = adapter
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token\n")
    result = await relay(config_for, start_gate, sink, url, wrong)
    assert result.data is not None and result.data[0] == 451 and result.data[1].startswith("4.3.0"), result
    assert sink.messages == []
