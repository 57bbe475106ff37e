"""While serving, stdout and stderr (which systemd's journal merges) carry JSON lines only:
aiosmtpd's warnings, Python's warnings and whatever a library prints become JSON events."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

from tests.conftest import write_config
from tests.support.configs import tls_auth_yaml
from tests.support.sink import client_tls_context
from tests.support.smtp import send
from tests.support.wire import free_port

BODY = b"Subject: auth\r\nMessage-ID: <auth-json@corp.example>\r\n\r\nbody\r\n"


def json_lines(output: bytes) -> list[dict]:
    """Every line parsed as one JSON object; a line that is not one fails the test."""
    events = []
    for number, line in enumerate(output.decode().splitlines(), 1):
        try:
            events.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
    return events


async def test_stdout_is_only_json_lines_after_auth(tmp_path, sink):
    port = free_port()
    config = write_config(tmp_path, tls_auth_yaml(tmp_path, sink.port, "required", "[]", port=port))
    # stderr into the same pipe, as the journal takes both.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smtpgate", "serve", "-c", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=str(tmp_path))
    try:
        async with asyncio.timeout(20):
            while b"smtpgate.ready" not in (line := await proc.stdout.readline()):
                # at EOF readline returns at once, and the timeout would never fire
                assert line, "smtpgate serve exited before it was ready"
        tls = client_tls_context(str(tmp_path / "tls" / "test-cert.pem"))
        for _ in range(2):
            result = await send("127.0.0.1", port, mail_from="jane@corp.example", rcpt_tos=["b@x.example"],
                                data=BODY, starttls=True, tls_context=tls, login=("jane", "s3cret pass"))
            assert result.data[0] == 250, result
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
    events = json_lines(rest)
    assert [e["success"] for e in events if e["event"] == "auth.result"] == [True, True]
    assert "message.relayed" in {e["event"] for e in events}
    assert not [e for e in events if e["event"].startswith("library.")]


def test_library_warnings_and_prints_become_json_events(tmp_path):
    script = """\
import logging, sys, warnings
from smtpgate.log import route_stray_output, setup_logging
route_stray_output()
setup_logging("json", "info")
warnings.warn("an old API", UserWarning)
logging.getLogger("mail.log").warning("Session.login_data is deprecated")
logging.getLogger("mail.log").debug("_handle_client readline: b'AUTH PLAIN c2VjcmV0'")
print("a library's print")
sys.stderr.write("half a line, ")
sys.stderr.write("then the rest\\n")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == b"", done.stderr
    events = json_lines(done.stdout)
    assert [(e["event"], e["level"]) for e in events] == [("library.log", "warning")] * 2 + [
        ("library.output", "warning")] * 2
    assert "an old API" in events[0]["message"] and events[0]["logger"] == "py.warnings"
    assert events[1] == {**events[1], "logger": "mail.log", "message": "Session.login_data is deprecated"}
    assert [(e["stream"], e["text"]) for e in events[2:]] == [
        ("stdout", "a library's print"), ("stderr", "half a line, then the rest")]
